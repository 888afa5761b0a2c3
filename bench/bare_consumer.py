"""The baseline of the worker part: a bare aio-pika consumer that acks every message,
one ack per message, and touches no database.

    python -m bench.bare_consumer QUEUE COUNT RESULT.json

It uses the worker's prefetch (512) and uvloop, like the worker, and stops after COUNT
acks. The result contains the monotonic times of the first and the last ack.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import aio_pika
import orjson
import uvloop

PREFETCH = 512  # the worker's default WORKER_PREFETCH


async def consume(url: str, queue_name: str, count: int) -> dict:
    connection = await aio_pika.connect(url)
    acked = 0
    first = last = 0.0
    done = asyncio.Event()
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.declare_queue(queue_name, passive=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal acked, first, last
            await message.ack()
            acked += 1
            last = time.monotonic()
            if acked == 1:
                first = last
            if acked >= count:
                done.set()

        await queue.consume(on_message, no_ack=False)
        await done.wait()
    finally:
        await connection.close()
    return {"acked": acked, "first": first, "last": last}


def main() -> int:
    queue_name, count, result_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    url = os.environ["AMQP_URL"]
    uvloop.install()
    result = asyncio.run(consume(url, queue_name, count))
    with open(result_path, "wb") as handle:
        handle.write(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
