"""The two baseline servers of the HTTP part, on the service's route `/{login}/images/{id}`.

    python -m bench.baselines bare  --port 18080
    python -m bench.baselines naive --port 18080 --database-url postgresql://...

- `bare`: aiohttp returning a fixed 600-byte JSON body. The ceiling of the stack: uvloop,
  no access log, no authentication, no database.
- `naive`: aiohttp + asyncpg, one query per request on the same read model
  (`SELECT ... FROM images WHERE uuid = $1`), the row serialized with orjson. The usual
  design: no cache, no authentication, no access log; a pool of 8 connections per
  process, the service's default DB_POOL_SIZE.

Each process binds its own socket with SO_REUSEPORT, so several processes started on
the same port share it as the service's HTTP_PROCESSES does.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket

import asyncpg
import orjson
import uvloop
from aiohttp import web

# 600 bytes of JSON: the size of a typical GetImage answer (docs/api.md's example is 609).
BARE_BODY = orjson.dumps({"id": "2b683a82-a066-11e3-97ab-2faa44701c5a", "padding": "x" * 542})
assert len(BARE_BODY) == 600, len(BARE_BODY)

_QUERY = "SELECT uuid::text AS uuid, revision, owner, public, state, acl, manifest FROM images WHERE uuid = $1 AND NOT deleted"
POOL = web.AppKey("pool", asyncpg.Pool)


async def bare_image(request: web.Request) -> web.Response:
    return web.Response(body=BARE_BODY, content_type="application/json")


async def naive_image(request: web.Request) -> web.Response:
    async with request.app[POOL].acquire() as connection:
        row = await connection.fetchrow(_QUERY, request.match_info["id"])
    if row is None:
        return web.Response(status=404, body=b'{"code":"ResourceNotFound"}', content_type="application/json")
    image = dict(row)
    image["manifest"] = orjson.loads(row["manifest"])
    return web.Response(body=orjson.dumps(image), content_type="application/json")


async def ping(request: web.Request) -> web.Response:
    return web.Response(body=b'{"ping":"pong"}', content_type="application/json")


def _socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(kind: str, port: int, database_url: str | None, pool_size: int) -> None:
    app = web.Application()
    app.router.add_get("/--ping", ping)
    if kind == "bare":
        app.router.add_get("/{login}/images/{id}", bare_image)
    else:
        # The json codec is left as asyncpg's default (text), as in most applications.
        app[POOL] = await asyncpg.create_pool(database_url, min_size=pool_size, max_size=pool_size)
        app.router.add_get("/{login}/images/{id}", naive_image)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, _socket(port)).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
    if kind == "naive":
        await app[POOL].close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["bare", "naive"])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 (shared with SO_REUSEPORT)")
    parser.add_argument("--database-url", help="Postgres DSN of the read model (naive only)")
    parser.add_argument("--pool-size", type=int, default=8, help="Postgres connections per process (naive only)")
    args = parser.parse_args()
    if args.kind == "naive" and not args.database_url:
        parser.error("naive needs --database-url")
    uvloop.install()
    asyncio.run(serve(args.kind, args.port, args.database_url, args.pool_size))


if __name__ == "__main__":
    main()
