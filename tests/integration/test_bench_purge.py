"""The freshness part of bench/run purges its queue before each repetition, so events
left by a worker that fell far behind do not delay the next repetition."""

import aio_pika

from bench.freshness_part import purge_queue

from tests.conftest import AMQP_URL, RUN_ID


async def test_purge_counts_leftover_events():
    name = f"test-{RUN_ID}.bench-purge"
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        for index in range(3):
            await channel.default_exchange.publish(aio_pika.Message(b"{}", message_id=str(index)), routing_key=name)

        assert await purge_queue(AMQP_URL, name) == 3
        assert await purge_queue(AMQP_URL, name) == 0
        declared = await channel.declare_queue(name, passive=True)
        assert declared.declaration_result.message_count == 0
    finally:
        cleanup = await connection.channel()
        await cleanup.queue_delete(name)
        await connection.close()


async def test_purge_of_missing_queue_returns_zero():
    assert await purge_queue(AMQP_URL, f"test-{RUN_ID}.bench-purge-missing") == 0
