"""Tests for the private PostgreSQL clusters and RabbitMQ nodes of fault tests.

Each test ends by checking that the shared services on 127.0.0.1:5432 and
127.0.0.1:5672 still accept connections, because no private instance may
touch them.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from tests.support.fixtures import private_postgres, private_rabbit  # noqa: F401
from tests.support.instances import InstanceError, PrivatePostgres, PrivateRabbit

pytestmark = pytest.mark.faults

SHARED_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
SHARED_RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"

POSTGRES_TIMEOUT = 60
RABBIT_TIMEOUT = 240


# --------------------------------------------------------------------------
# Helpers


async def assert_shared_services_reachable() -> None:
    connection = await asyncpg.connect(SHARED_POSTGRES_DSN, timeout=10)
    try:
        assert await connection.fetchval("SELECT 1") == 1
    finally:
        await connection.close()

    amqp = await aio_pika.connect(SHARED_RABBIT_URL, timeout=10)
    await amqp.close()


def process_exists(pid: int) -> bool:
    """Return True when pid names a process that is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def listening_addresses(port: int) -> set[str]:
    """Return the local addresses of TCP sockets listening on port."""
    addresses = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address_hex, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A is TCP_LISTEN
                continue
            # The kernel prints each 32-bit word of the address in host
            # (little-endian) byte order.
            raw = bytes.fromhex(address_hex)
            words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
            addresses.add(socket.inet_ntop(family, b"".join(words)))
    return addresses


def watch_termination(connection: asyncpg.Connection) -> asyncio.Future[None]:
    """Return a future that completes when asyncpg closes connection.

    Call it before injecting the fault. A query sent right after the fault
    can fail with InternalClientError instead of a connection error, when
    asyncpg has not read the backend's FATAL message yet, so tests wait for
    the close first.
    """
    terminated: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_termination(_connection: object) -> None:
        if not terminated.done():
            terminated.set_result(None)

    connection.add_termination_listener(on_termination)
    return terminated


def watch_close(connection: aio_pika.abc.AbstractConnection) -> asyncio.Future[BaseException | None]:
    """Return a future that receives the error reported when connection closes.

    Call it before injecting the fault, so the close cannot happen before the
    callback is registered.
    """
    closed: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def on_close(_sender: object, error: BaseException | None) -> None:
        if not closed.done():
            closed.set_result(error)

    connection.close_callbacks.add(on_close)
    return closed


async def publish_persistent(url: str, queue_name: str, body: bytes) -> None:
    """Declare a durable quorum queue and publish a persistent, confirmed message."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue_name,
        )
    finally:
        await connection.close()


async def consume_all(url: str, queue_name: str) -> list[bytes]:
    """Fetch and acknowledge every message in an existing queue."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        bodies = []
        while True:
            message = await queue.get(fail=False, timeout=10)
            if message is None:
                return bodies
            await message.ack()
            bodies.append(message.body)
    finally:
        await connection.close()


# --------------------------------------------------------------------------
# PostgreSQL


@pytest.mark.timeout(POSTGRES_TIMEOUT)
async def test_postgres_loopback_only(private_postgres: PrivatePostgres) -> None:
    connection = await asyncpg.connect(private_postgres.dsn(), timeout=10)
    try:
        listen = await connection.fetchval("SHOW listen_addresses")
        socket_dir = await connection.fetchval("SHOW unix_socket_directories")
    finally:
        await connection.close()

    assert listen == "127.0.0.1"
    assert socket_dir == str(private_postgres.base_dir)
    assert listening_addresses(private_postgres.port) == {"127.0.0.1"}
    await assert_shared_services_reachable()


@pytest.mark.timeout(POSTGRES_TIMEOUT)
async def test_postgres_restart_keeps_data(private_postgres: PrivatePostgres) -> None:
    connection = await asyncpg.connect(private_postgres.dsn(), timeout=10)
    await connection.execute("CREATE TABLE images (uuid text PRIMARY KEY)")
    await connection.execute("INSERT INTO images VALUES ('image-1')")
    await connection.close()
    port = private_postgres.port
    old_pid = private_postgres.pid

    await asyncio.to_thread(private_postgres.restart)

    assert private_postgres.port == port
    assert private_postgres.pid != old_pid
    assert not process_exists(old_pid)
    connection = await asyncpg.connect(private_postgres.dsn(), timeout=10)
    try:
        assert await connection.fetchval("SELECT uuid FROM images") == "image-1"
    finally:
        await connection.close()
    await assert_shared_services_reachable()


@pytest.mark.timeout(POSTGRES_TIMEOUT)
async def test_postgres_kill_then_start_recovers(private_postgres: PrivatePostgres) -> None:
    connection = await asyncpg.connect(private_postgres.dsn(), timeout=10)
    await connection.execute("CREATE TABLE images (uuid text PRIMARY KEY)")
    await connection.execute("INSERT INTO images VALUES ('committed-before-kill')")
    terminated = watch_termination(connection)
    pid = private_postgres.pid

    await asyncio.to_thread(private_postgres.kill)

    assert not private_postgres.is_running
    assert not process_exists(pid)
    await asyncio.wait_for(terminated, timeout=15)
    assert connection.is_closed()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(private_postgres.dsn(), timeout=5)
    with pytest.raises(InstanceError, match="not running"):
        private_postgres.kill()

    await asyncio.to_thread(private_postgres.start)

    log_text = private_postgres.log_path.read_text()
    assert "automatic recovery in progress" in log_text
    connection = await asyncpg.connect(private_postgres.dsn(), timeout=10)
    try:
        assert await connection.fetchval("SELECT uuid FROM images") == "committed-before-kill"
    finally:
        await connection.close()
    await assert_shared_services_reachable()


@pytest.mark.timeout(POSTGRES_TIMEOUT)
async def test_postgres_terminate_backends_breaks_connection(
    private_postgres: PrivatePostgres,
) -> None:
    victim = await asyncpg.connect(private_postgres.dsn(), timeout=10)
    terminated = watch_termination(victim)

    count = await asyncio.to_thread(private_postgres.terminate_backends)

    assert count == 1
    await asyncio.wait_for(terminated, timeout=15)
    assert victim.is_closed()
    with pytest.raises(asyncpg.exceptions.InterfaceError, match="connection is closed"):
        await victim.fetchval("SELECT 1")
    assert private_postgres.is_running
    survivor = await asyncpg.connect(private_postgres.dsn(), timeout=10)
    try:
        assert await survivor.fetchval("SELECT 1") == 1
    finally:
        await survivor.close()
    await assert_shared_services_reachable()


@pytest.mark.timeout(POSTGRES_TIMEOUT)
async def test_postgres_create_database_returns_dsn(private_postgres: PrivatePostgres) -> None:
    dsn = private_postgres.create_database('cloudapi "images"')

    assert dsn == private_postgres.dsn('cloudapi "images"')
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        assert await connection.fetchval("SELECT current_database()") == 'cloudapi "images"'
    finally:
        await connection.close()
    with pytest.raises(InstanceError, match="already exists"):
        private_postgres.create_database('cloudapi "images"')
    await assert_shared_services_reachable()


@pytest.mark.timeout(POSTGRES_TIMEOUT)
async def test_postgres_stop_modes(private_postgres: PrivatePostgres) -> None:
    with pytest.raises(ValueError, match="invalid stop mode"):
        private_postgres.stop("abrupt")

    for mode in PrivatePostgres.STOP_MODES:
        await asyncio.to_thread(private_postgres.stop, mode)
        assert not private_postgres.is_running, mode
        await asyncio.to_thread(private_postgres.start)
        connection = await asyncpg.connect(private_postgres.dsn(), timeout=10)
        await connection.close()

    await asyncio.to_thread(private_postgres.stop)
    await asyncio.to_thread(private_postgres.stop)
    assert not private_postgres.is_running
    await assert_shared_services_reachable()


@pytest.mark.timeout(POSTGRES_TIMEOUT)
async def test_postgres_close_cleans_up_after_error() -> None:
    with pytest.raises(RuntimeError, match="simulated test failure"):
        with PrivatePostgres() as postgres:
            base_dir = postgres.base_dir
            pid = postgres.pid
            client = await asyncpg.connect(postgres.dsn(), timeout=10)
            raise RuntimeError("simulated test failure")

    client.terminate()
    assert not base_dir.exists()
    assert not process_exists(pid)
    postgres.close()
    with pytest.raises(InstanceError, match="closed"):
        postgres.start()
    await assert_shared_services_reachable()


@pytest.mark.timeout(POSTGRES_TIMEOUT)
async def test_postgres_failed_start_reports_log() -> None:
    postgres = PrivatePostgres(settings={"shared_buffers": "'not a size'"})

    with pytest.raises(InstanceError, match="invalid value for parameter") as raised:
        with postgres:
            pass

    assert "server log" in str(raised.value)
    assert not postgres.base_dir.exists()
    await assert_shared_services_reachable()


@pytest.mark.timeout(POSTGRES_TIMEOUT)
async def test_postgres_two_clusters_at_once(private_postgres: PrivatePostgres) -> None:
    with PrivatePostgres() as second:
        assert second.port != private_postgres.port
        assert second.base_dir != private_postgres.base_dir
        for dsn in (private_postgres.dsn(), second.dsn()):
            connection = await asyncpg.connect(dsn, timeout=10)
            await connection.close()
    await assert_shared_services_reachable()


# --------------------------------------------------------------------------
# RabbitMQ


@pytest.mark.timeout(RABBIT_TIMEOUT)
async def test_rabbit_loopback_only(private_rabbit: PrivateRabbit) -> None:
    assert private_rabbit.url() == f"amqp://guest:guest@127.0.0.1:{private_rabbit.port}/"
    assert private_rabbit.node_name.startswith("cloudapi-test-")
    assert private_rabbit.node_name != "rabbit@localhost"
    assert listening_addresses(private_rabbit.port) == {"127.0.0.1"}
    assert listening_addresses(private_rabbit.dist_port) == {"127.0.0.1"}
    # The management plugin, which would listen on 15672, stays off.
    plugins = private_rabbit.rabbitmqctl("eval", "rabbit_plugins:active().").stdout
    assert plugins.strip() == "[]"
    await assert_shared_services_reachable()


@pytest.mark.timeout(RABBIT_TIMEOUT)
async def test_rabbit_fault_sequence(private_rabbit: PrivateRabbit) -> None:
    """Restart, force-close and kill one node, and check that messages survive."""
    url = private_rabbit.url()
    await publish_persistent(url, "images.events", b"published-before-restart")

    old_pid = private_rabbit.pid
    await asyncio.to_thread(private_rabbit.restart)

    assert private_rabbit.url() == url
    assert private_rabbit.pid != old_pid
    assert not process_exists(old_pid)
    assert await consume_all(url, "images.events") == [b"published-before-restart"]

    connection = await aio_pika.connect(url, timeout=10)
    closed = watch_close(connection)
    await asyncio.to_thread(private_rabbit.close_connections, "fault injection test")
    error = await asyncio.wait_for(closed, timeout=15)
    assert "CONNECTION_FORCED - fault injection test" in str(error)

    # NOTE: the queue was declared before the restart above on purpose. With
    # RabbitMQ 3.10.8, a quorum queue declared on a freshly started node
    # seconds before SIGKILL came back leaderless (raft state follower,
    # term 0) and basic.get on it hung, while one that existed before a
    # graceful restart recovered.
    await publish_persistent(url, "images.events", b"published-before-kill")
    connection = await aio_pika.connect(url, timeout=10)
    closed = watch_close(connection)
    pid = private_rabbit.pid
    await asyncio.to_thread(private_rabbit.kill)

    assert not private_rabbit.is_running
    assert not process_exists(pid)
    assert isinstance(await asyncio.wait_for(closed, timeout=15), ConnectionError)
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError):
        await aio_pika.connect(url, timeout=5)
    with pytest.raises(InstanceError, match="not running"):
        private_rabbit.kill()

    await asyncio.to_thread(private_rabbit.start)

    assert await consume_all(url, "images.events") == [b"published-before-kill"]
    await assert_shared_services_reachable()


@pytest.mark.timeout(RABBIT_TIMEOUT)
async def test_rabbit_two_nodes_at_once(private_rabbit: PrivateRabbit) -> None:
    with PrivateRabbit() as second:
        assert second.node_name != private_rabbit.node_name
        ports = {private_rabbit.port, private_rabbit.dist_port, second.port, second.dist_port}
        assert len(ports) == 4
        for url in (private_rabbit.url(), second.url()):
            connection = await aio_pika.connect(url, timeout=10)
            await connection.close()
    await assert_shared_services_reachable()


@pytest.mark.timeout(RABBIT_TIMEOUT)
async def test_rabbit_close_cleans_up_after_error() -> None:
    with pytest.raises(RuntimeError, match="simulated test failure"):
        with PrivateRabbit() as rabbit:
            base_dir = rabbit.base_dir
            pid = rabbit.pid
            client = await aio_pika.connect(rabbit.url(), timeout=10)
            closed = watch_close(client)
            raise RuntimeError("simulated test failure")

    assert not base_dir.exists()
    assert not process_exists(pid)
    await asyncio.wait_for(closed, timeout=15)
    rabbit.close()
    with pytest.raises(InstanceError, match="closed"):
        rabbit.start()
    await assert_shared_services_reachable()


@pytest.mark.timeout(RABBIT_TIMEOUT)
async def test_rabbit_start_timeout_cleans_up() -> None:
    rabbit = PrivateRabbit(start_timeout=0.5)

    with pytest.raises(InstanceError, match="did not start within 0.5 s") as raised:
        with rabbit:
            pass

    assert "node log" in str(raised.value)
    assert not rabbit.base_dir.exists()
    await assert_shared_services_reachable()
