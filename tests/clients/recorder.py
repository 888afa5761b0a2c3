"""Record the HTTP requests that real CloudAPI clients send.

A stand-in CloudAPI for studying `triton image get` and `sdc-getimage`:
it binds to 127.0.0.1 only, writes every request line with all headers
(in wire order) as one JSON object per line, and responds to

- ``GET /--ping`` with a CloudAPI-style ping body,
- ``GET /:login/images/KNOWN_IMAGE_ID`` with a canned image,
- any other path with a 404 ``ResourceNotFound`` error.

It verifies no signature and logs Authorization headers in full, so use it
only with throwaway keys. Run it as
``python tests/clients/recorder.py --log requests.jsonl``. It prints
``listening on http://127.0.0.1:PORT`` on stdout once it accepts
connections, so a test can start it with ``--port 0`` and read the port.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

from aiohttp import web

KNOWN_IMAGE_ID = "2b683a82-a066-11e3-97ab-2faa44701c5a"
KNOWN_IMAGE = {
    "id": KNOWN_IMAGE_ID,
    "name": "base",
    "version": "13.4.0",
    "os": "smartos",
    "requirements": {},
    "type": "zone-dataset",
    "published_at": "2014-02-28T10:50:42Z",
    "owner": "930896af-bf8c-48d4-885c-6573a94b1853",
    "public": True,
    "state": "active",
}
# Api-Version response header value: the CloudAPI release the recorder claims.
API_VERSION = "9.0.0"
SERVER_NAME = "cloudapi-images-recorder"

log = logging.getLogger("recorder")


def content_md5(body: bytes) -> str:
    """Return the Content-MD5 value (RFC 1864) of the exact body bytes."""
    return base64.b64encode(hashlib.md5(body).digest()).decode("ascii")


def json_response(status: int, payload: dict, *, bad_md5: bool = False) -> web.Response:
    body = json.dumps(payload).encode("utf-8")
    md5 = content_md5(b"not the body" if bad_md5 else body)
    return web.Response(
        status=status,
        body=body,
        headers={
            "Content-Type": "application/json",
            "Content-MD5": md5,
            "Api-Version": API_VERSION,
            "Server": SERVER_NAME,
        },
    )


class Recorder:
    """Request log plus the response choices set on the command line."""

    def __init__(self, log_path: Path | None, deny_auth: bool, bad_md5: bool):
        self.log_path = log_path
        self.deny_auth = deny_auth
        self.bad_md5 = bad_md5

    def record(self, request: web.Request) -> None:
        entry = {
            "received_at": datetime.now(timezone.utc).isoformat(),
            "request_line": (
                f"{request.method} {request.raw_path} "
                f"HTTP/{request.version.major}.{request.version.minor}"
            ),
            # raw_headers keeps the wire order, case and duplicates.
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, value in request.raw_headers
            ],
        }
        line = json.dumps(entry)
        log.info("request: %s", line)
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as log_file:
                log_file.write(line + "\n")

    async def handle(self, request: web.Request) -> web.Response:
        self.record(request)

        if request.path == "/--ping":
            return json_response(
                200,
                {"ping": "pong", "cloudapi": {"versions": [API_VERSION]}},
                bad_md5=self.bad_md5,
            )

        if self.deny_auth:
            return json_response(
                401,
                {"code": "InvalidCredentials", "message": "Invalid key"},
                bad_md5=self.bad_md5,
            )

        parts = request.path.split("/")
        # "/:login/images/:id" splits into ["", login, "images", id].
        if (
            request.method == "GET"
            and len(parts) == 4
            and parts[1]
            and parts[2] == "images"
        ):
            image_id = parts[3]
            if image_id == KNOWN_IMAGE_ID:
                return json_response(200, KNOWN_IMAGE, bad_md5=self.bad_md5)
            return json_response(
                404,
                {"code": "ResourceNotFound", "message": f"image {image_id} not found"},
                bad_md5=self.bad_md5,
            )

        return json_response(
            404,
            {"code": "ResourceNotFound", "message": f"{request.path} does not exist"},
            bad_md5=self.bad_md5,
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 picks a free one)"
    )
    parser.add_argument(
        "--log", type=Path, help="append one JSON object per request to this file"
    )
    parser.add_argument(
        "--deny-auth",
        action="store_true",
        help="respond to every request except /--ping with 401 InvalidCredentials",
    )
    parser.add_argument(
        "--bad-md5",
        action="store_true",
        help="send a Content-MD5 that does not match the body",
    )
    return parser.parse_args(argv)


async def start(args: argparse.Namespace) -> web.AppRunner:
    recorder = Recorder(args.log, args.deny_auth, args.bad_md5)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()

    port = runner.addresses[0][1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    log.info("started on 127.0.0.1:%d", port)
    return runner


async def serve(args: argparse.Namespace) -> None:
    runner = await start(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        log.info("stopped")


def main(argv: list[str]) -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
