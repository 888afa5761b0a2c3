"""Private PostgreSQL clusters and RabbitMQ nodes for fault-injection tests.

Fault-injection tests stop, restart and kill the servers they talk to. The
machine's shared services (PostgreSQL on 127.0.0.1:5432, the RabbitMQ node
``rabbit@localhost`` on 127.0.0.1:5672) must stay up for every other test,
so each test gets its own server from this module instead.

Constraints:

* Loopback only. Every server listens on 127.0.0.1, on a port picked at
  random below the kernel's ephemeral port range and checked to be free.
  The RabbitMQ distribution listener is also bound to 127.0.0.1.
* Root. ``initdb`` and ``postgres`` refuse to run as root, so when the
  effective uid is 0 the PostgreSQL binaries run as the ``postgres`` system
  user (subprocess's ``user=``, as ``runuser -u postgres`` would) and the
  temporary directory belongs to that user.
  RabbitMQ runs as the calling user, with ``HOME`` in its temporary directory
  and a random Erlang cookie, so its CLI cannot reach the shared node.
* Bounded waits. Every wait for a server to start, stop or exit has a
  timeout. A failed or timed-out start or stop raises ``InstanceError`` with
  the tail of the server log.
* Cleanup. ``close()``, and so the context managers and the pytest fixtures,
  stop the server, kill any process still running inside the temporary
  directory, and remove the directory, also when the test failed.

The methods block. From an async test, call them through
``await asyncio.to_thread(instance.restart)`` so that clients on the event
loop keep running while the server is down.

Binary locations can be overridden with ``CLOUDAPI_TEST_PG_BINDIR`` (the
directory with ``initdb``, ``pg_ctl``, ``postgres``, ``psql`` and
``pg_isready``) and
``CLOUDAPI_TEST_RABBITMQ_SBINDIR`` (the directory with the unwrapped
``rabbitmq-server`` and ``rabbitmqctl`` scripts).
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "InstanceError",
    "PrivatePostgres",
    "PrivateRabbit",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Ports that shared services use, or use while they are up. The shared
# RabbitMQ node listens for Erlang distribution on 25672 (AMQP port + 20000),
# and rabbitmqctl takes its own distribution port from 35672-35682.
_RESERVED_PORTS = frozenset(
    {1883, 3306, 4222, 4369, 5432, 5672, 6379, 15672, 25672, *range(35672, 35683)}
)
_LOWEST_PORT = 10000

# Ports handed out in this process and not yet bound by a server.
_allocated_ports: set[int] = set()

# Instances not yet closed, closed at interpreter exit as a last resort.
_open_instances: set[PrivatePostgres | PrivateRabbit] = set()


class InstanceError(RuntimeError):
    """A private server failed to start or stop, or a binary is missing."""


# --------------------------------------------------------------------------
# Helpers shared by both kinds of instance


def _ephemeral_port_floor() -> int:
    """Return the lowest port the kernel hands out to outgoing connections."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def allocate_port() -> int:
    """Pick a free loopback port outside the ephemeral range and reserved ports.

    Ports below the ephemeral range are used so that an outgoing connection
    cannot take a private server's port while that server restarts. Another
    process can still bind the port before the server does, so the callers
    retry the first start on a new port when the bind fails.
    """
    ceiling = _ephemeral_port_floor() - 1
    for _ in range(200):
        port = random.randint(_LOWEST_PORT, ceiling)
        if port in _RESERVED_PORTS or port in _allocated_ports:
            continue
        if _port_is_free(port):
            _allocated_ports.add(port)
            return port
    raise InstanceError(
        f"no free loopback port found in {_LOWEST_PORT}-{ceiling} after 200 tries"
    )


def _release_ports(*ports: int) -> None:
    for port in ports:
        _allocated_ports.discard(port)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(cannot read {path}: {error})"
    return "\n".join(text.splitlines()[-lines:])


def _process_running(pid: int) -> bool:
    """Return True when the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the command name, which is in parentheses and
    # may itself contain spaces or parentheses.
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _pids_inside(directory: Path) -> list[int]:
    """Return the pids of processes whose working directory is inside directory.

    Both kinds of server run with their working directory in the instance's
    temporary directory, so this finds every process of an instance, also
    orphans whose parent was killed.
    """
    root = str(directory.resolve())
    pids = []
    for entry in glob.glob("/proc/[0-9]*"):
        try:
            cwd = os.readlink(f"{entry}/cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + "/"):
            pid = int(entry.rsplit("/", 1)[1])
            if pid != os.getpid() and _process_running(pid):
                pids.append(pid)
    return pids


def _wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll condition until it returns True or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _kill_leftovers(directory: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process still running inside directory and wait for them."""
    leftovers = _pids_inside(directory)
    if not leftovers:
        return
    log.warning("killing leftover processes %s in %s", leftovers, directory)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not _wait_until(lambda: not _pids_inside(directory), timeout):
        raise InstanceError(
            f"processes {_pids_inside(directory)} in {directory} still run "
            f"{timeout:g} s after SIGKILL"
        )


def _clean_env(drop_prefixes: Sequence[str]) -> dict[str, str]:
    """Copy os.environ without variables that would redirect a private server."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(tuple(drop_prefixes))
    }


@atexit.register
def _close_open_instances() -> None:
    for instance in list(_open_instances):
        try:
            instance.close()
        except Exception:  # noqa: BLE001 - at exit, report and go on
            log.exception("failed to close %r at exit", instance)


# --------------------------------------------------------------------------
# PostgreSQL


def find_postgres_bindir() -> Path:
    """Find the directory with initdb, pg_ctl, postgres, psql and pg_isready.

    Order: ``CLOUDAPI_TEST_PG_BINDIR``, the newest ``/usr/lib/postgresql/*/bin``
    (Debian and Ubuntu), then the directory of ``initdb`` on PATH after
    resolving symlinks.
    """
    required = ("initdb", "pg_ctl", "postgres", "psql", "pg_isready")

    def complete(directory: Path) -> bool:
        return all(os.access(directory / name, os.X_OK) for name in required)

    override = os.environ.get("CLOUDAPI_TEST_PG_BINDIR")
    if override:
        if not complete(Path(override)):
            raise InstanceError(
                f"CLOUDAPI_TEST_PG_BINDIR={override} does not contain {', '.join(required)}"
            )
        return Path(override)

    def major_version(path: str) -> int:
        name = Path(path).parent.name
        return int(name) if name.isdigit() else 0

    debian_dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major_version, reverse=True)
    for candidate in debian_dirs:
        if complete(Path(candidate)):
            return Path(candidate)

    initdb = shutil.which("initdb")
    if initdb and complete(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent

    raise InstanceError(
        "PostgreSQL server binaries not found: install the server package "
        "(Debian: postgresql) or set CLOUDAPI_TEST_PG_BINDIR to the directory "
        "that contains initdb, pg_ctl, postgres, psql and pg_isready"
    )


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a private loopback port.

    The cluster is created by the first ``start()`` with trust authentication
    for the superuser ``postgres`` and lives until ``close()``. Its port stays
    the same across ``stop()``, ``restart()`` and ``kill()``.

    The postmaster runs as a child of this process instead of being
    daemonized by ``pg_ctl start``. A daemonized postmaster that is killed
    stays a zombie until PID 1 reaps it, and while it does, the next start
    fails because postmaster.pid names a process that still exists.
    """

    STOP_MODES = ("smart", "fast", "immediate")

    # fsync and full_page_writes only guard against an operating system
    # crash, which these tests never cause. synchronous_commit stays on, so a
    # row whose COMMIT returned survives kill().
    DEFAULT_SETTINGS: Mapping[str, str] = {
        "fsync": "off",
        "full_page_writes": "off",
        "max_connections": "50",
        "shared_buffers": "32MB",
        "log_line_prefix": "'%m [%p] %q%u@%d '",
    }

    def __init__(
        self,
        *,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 30.0,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Prepare an instance; nothing runs until start().

        settings are extra postgresql.conf lines (values as PostgreSQL reads
        them, so strings need single quotes). base_dir is the parent of the
        temporary directory and must be reachable by the postgres user.
        """
        self.bindir = find_postgres_bindir()
        self.host = LOOPBACK
        self.user = "postgres"
        self.port = 0
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._settings = {**self.DEFAULT_SETTINGS, **(settings or {})}
        self._parent_dir = Path(base_dir) if base_dir else Path(tempfile.gettempdir())
        self._base_dir: Path | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._port_confirmed = False
        self._closed = False

    # -- paths ------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        """Temporary directory with the data directory, log and socket."""
        if self._base_dir is None:
            raise InstanceError("the private PostgreSQL cluster has not been started yet")
        return self._base_dir

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    # -- public API ---------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        """Return a libpq/asyncpg URL for database on this cluster."""
        if not self.port:
            raise InstanceError("the private PostgreSQL cluster has not been started yet")
        quoted = urllib.parse.quote(database, safe="")
        return f"postgresql://{self.user}@{self.host}:{self.port}/{quoted}"

    @property
    def pid(self) -> int | None:
        """Pid of the running postmaster, else None."""
        if self._server is not None and self._server.poll() is None:
            return self._server.pid
        return None

    @property
    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Start the postmaster, creating the cluster on the first call.

        Returns when the server accepts connections. Raises InstanceError
        after start_timeout seconds or when the postmaster exits during
        startup.
        """
        if self._closed:
            raise InstanceError("this PrivatePostgres was closed and cannot start again")
        if self.is_running:
            raise InstanceError(f"the private PostgreSQL on port {self.port} is already running")
        if self._base_dir is None:
            _open_instances.add(self)
            self._create_cluster()

        # Until the first successful start, a port taken by another process
        # is replaced by a new one. Afterwards clients rely on the port.
        attempts = 1 if self._port_confirmed else 3
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            if self._try_start():
                self._port_confirmed = True
                log.info(
                    "private PostgreSQL started on %s:%d in %.2f s (pid %s, dir %s)",
                    self.host, self.port, time.monotonic() - started, self.pid, self.base_dir,
                )
                return
            if attempt < attempts:
                log.warning("port %d was taken, retrying on another port", self.port)
                _release_ports(self.port)
                self.port = allocate_port()
        raise InstanceError(
            f"private PostgreSQL could not bind a free port after {attempts} attempts; "
            f"server log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the postmaster with pg_ctl's shutdown mode (smart, fast or immediate).

        Does nothing when the server is not running. Raises InstanceError
        after stop_timeout seconds.
        """
        if mode not in self.STOP_MODES:
            raise ValueError(f"invalid stop mode {mode!r}: expected one of {self.STOP_MODES}")
        if not self.is_running:
            self._reap_server()
            return
        timeout = max(1, int(self.stop_timeout))
        self._pg_ctl(["stop", "-m", mode, "-w", "-t", str(timeout)], timeout + 10, "stop")
        self._reap_server()
        log.info("private PostgreSQL on port %d stopped (%s)", self.port, mode)

    def restart(self) -> None:
        """Stop the server in fast mode and start it again on the same port."""
        self.stop("fast")
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster, as in a crash, and wait for its children to exit.

        The pid comes from postmaster.pid. The next start() runs crash
        recovery. Raises InstanceError when the server is not running or a
        process outlives stop_timeout.
        """
        if not self.is_running:
            raise InstanceError(f"the private PostgreSQL on port {self.port} is not running")
        pid = self._read_pid_file()
        if pid != self.pid:
            raise InstanceError(
                f"postmaster.pid names pid {pid} but the postmaster started here is {self.pid}"
            )
        os.kill(pid, signal.SIGKILL)
        self._reap_server()
        log.info("private PostgreSQL postmaster %d on port %d killed", pid, self.port)

        # Backends notice the postmaster's death and exit on their own. A new
        # postmaster fails to start while they still hold shared memory.
        if not _wait_until(lambda: not _pids_inside(self.base_dir), self.stop_timeout):
            raise InstanceError(
                f"PostgreSQL processes {_pids_inside(self.base_dir)} still run "
                f"{self.stop_timeout:g} s after the postmaster was killed"
            )

    def terminate_backends(self) -> int:
        """Terminate every other client backend and return how many were terminated.

        Runs pg_terminate_backend through a new psql connection and waits up
        to 5 s for each backend to exit (the two-argument form needs
        PostgreSQL 14 or newer).
        """
        output = self._psql(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
            "FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        count = int(output.strip())
        log.info("terminated %d client backends on private PostgreSQL port %d", count, self.port)
        return count

    def create_database(self, name: str) -> str:
        """Create database name and return its DSN."""
        quoted = '"' + name.replace('"', '""') + '"'
        self._psql(f"CREATE DATABASE {quoted}")
        return self.dsn(name)

    def close(self) -> None:
        """Stop the server, kill leftover processes and remove the temporary directory.

        Safe to call more than once, and after a failed start.
        """
        if self._closed:
            return
        self._closed = True
        _open_instances.discard(self)
        if self._base_dir is None:
            return
        try:
            try:
                self.stop("fast")
            except InstanceError:
                log.exception("fast stop failed, killing private PostgreSQL instead")
                if self.is_running:
                    self.kill()
            _kill_leftovers(self._base_dir)
        finally:
            self._reap_server()
            shutil.rmtree(self._base_dir, ignore_errors=True)
            _release_ports(self.port)
            log.info("private PostgreSQL on port %d closed", self.port)

    def __enter__(self) -> PrivatePostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrivatePostgres(port={self.port}, base_dir={self._base_dir})"

    # -- internals ----------------------------------------------------------

    def _server_user_options(self) -> dict[str, object]:
        """Return subprocess options that run a server binary as the postgres user.

        initdb and postgres refuse to run as root. Without root, they run as
        the calling user.
        """
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _server_env(self) -> dict[str, str]:
        # PG* variables such as PGDATA, PGHOST or PGOPTIONS would point the
        # tools at another cluster or change how they connect.
        env = _clean_env(["PG"])
        env["LC_ALL"] = "C.UTF-8"
        return env

    def _create_cluster(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="cloudapi-pg-", dir=self._parent_dir))
        self._base_dir = base
        if os.geteuid() == 0:
            shutil.chown(base, user="postgres", group="postgres")
        self.port = allocate_port()

        started = time.monotonic()
        command = [
            str(self.bindir / "initdb"),
            "--pgdata", str(self.data_dir),
            "--username", self.user,
            "--auth", "trust",
            "--encoding", "UTF8",
            "--locale", "C.UTF-8",
            "--no-sync",
        ]
        try:
            result = subprocess.run(
                command,
                cwd=base,
                env=self._server_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.start_timeout,
                **self._server_user_options(),
            )
        except subprocess.TimeoutExpired as error:
            raise InstanceError(
                f"initdb timed out after {self.start_timeout:g} s in {self.data_dir}"
            ) from error
        if result.returncode != 0:
            raise InstanceError(
                f"initdb failed with exit code {result.returncode} in {self.data_dir}:\n"
                f"{result.stdout}{result.stderr}"
            )

        # The port is passed on the postgres command line, so that a retry
        # on another port does not rewrite this file.
        lines = [
            "",
            "# Settings for a private test cluster",
            f"listen_addresses = '{LOOPBACK}'",
            f"unix_socket_directories = '{base}'",
        ]
        lines += [f"{key} = {value}" for key, value in self._settings.items()]
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n".join(lines) + "\n")
        log.info("initdb for private PostgreSQL took %.2f s", time.monotonic() - started)

    def _try_start(self) -> bool:
        """Start the postmaster and return False when its port was already in use."""
        log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as server_log:
            # A new session keeps a Ctrl-C in the terminal from reaching the
            # postmaster directly, so close() decides how it stops.
            self._server = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)],
                cwd=self.base_dir,
                env=self._server_env(),
                stdin=subprocess.DEVNULL,
                stdout=server_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._server_user_options(),
            )

        deadline = time.monotonic() + self.start_timeout
        while not self._accepts_connections():
            exit_code = self._server.poll()
            if exit_code is not None:
                self._reap_server()
                new_log = self.log_path.read_bytes()[log_size:].decode(errors="replace")
                if "Address already in use" in new_log and not self._port_confirmed:
                    return False
                raise InstanceError(
                    f"postgres exited with code {exit_code} during startup on port "
                    f"{self.port}; server log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                self._server.kill()
                self._reap_server()
                raise InstanceError(
                    f"private PostgreSQL on port {self.port} did not accept connections "
                    f"within {self.start_timeout:g} s; server log {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.05)
        return True

    def _accepts_connections(self) -> bool:
        result = subprocess.run(
            [
                str(self.bindir / "pg_isready"),
                "--host", self.host,
                "--port", str(self.port),
                "--username", self.user,
                "--timeout", "1",
            ],
            env=self._server_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
        )
        return result.returncode == 0

    def _read_pid_file(self) -> int:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            return int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError) as error:
            raise InstanceError(f"cannot read the postmaster pid from {pid_file}: {error}") from error

    def _reap_server(self) -> None:
        if self._server is None:
            return
        try:
            self._server.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("postmaster %d did not exit within %g s", self._server.pid, self.stop_timeout)
            return
        self._server = None

    def _pg_ctl(self, args: list[str], timeout: float, action: str) -> None:
        command = [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args]
        try:
            result = subprocess.run(
                command,
                cwd=self.base_dir,
                env=self._server_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                **self._server_user_options(),
            )
        except subprocess.TimeoutExpired as error:
            raise InstanceError(
                f"pg_ctl {action} timed out after {timeout:g} s on port {self.port}; "
                f"server log {self.log_path}:\n{_tail(self.log_path)}"
            ) from error
        if result.returncode != 0:
            raise InstanceError(
                f"pg_ctl {action} failed with exit code {result.returncode} on port "
                f"{self.port}: {result.stdout.strip()} {result.stderr.strip()}\n"
                f"server log {self.log_path}:\n{_tail(self.log_path)}"
            )

    def _psql(self, sql: str, database: str = "postgres") -> str:
        env = _clean_env(["PG"])
        env["PGCONNECT_TIMEOUT"] = "5"
        command = [
            str(self.bindir / "psql"),
            "--no-psqlrc", "--quiet", "--tuples-only", "--no-align",
            "--set", "ON_ERROR_STOP=1",
            "--host", self.host,
            "--port", str(self.port),
            "--username", self.user,
            "--dbname", database,
            "--command", sql,
        ]
        try:
            result = subprocess.run(
                command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired as error:
            raise InstanceError(f"psql timed out after 30 s on port {self.port}: {sql}") from error
        if result.returncode != 0:
            raise InstanceError(
                f"psql failed with exit code {result.returncode} on port {self.port}: "
                f"{sql}\n{result.stderr.strip()}"
            )
        return result.stdout


# --------------------------------------------------------------------------
# RabbitMQ


def find_rabbitmq_sbindir() -> Path:
    """Find the directory with the rabbitmq-server and rabbitmqctl scripts.

    Order: ``CLOUDAPI_TEST_RABBITMQ_SBINDIR``, Debian's ``/usr/lib/rabbitmq/bin``,
    then the directory of ``rabbitmq-server`` on PATH. Debian's
    ``/usr/sbin/rabbitmq-server`` is skipped: it switches to the rabbitmq user
    with su, which replaces HOME and so the Erlang cookie of a private node.
    """
    required = ("rabbitmq-server", "rabbitmqctl")

    def complete(directory: Path) -> bool:
        return all(os.access(directory / name, os.X_OK) for name in required)

    def is_su_wrapper(script: Path) -> bool:
        try:
            return "su rabbitmq" in script.read_text(errors="replace")
        except OSError:
            return False

    override = os.environ.get("CLOUDAPI_TEST_RABBITMQ_SBINDIR")
    if override:
        if not complete(Path(override)):
            raise InstanceError(
                f"CLOUDAPI_TEST_RABBITMQ_SBINDIR={override} does not contain "
                f"{', '.join(required)}"
            )
        return Path(override)

    debian_dir = Path("/usr/lib/rabbitmq/bin")
    if complete(debian_dir):
        return debian_dir

    server = shutil.which("rabbitmq-server")
    if server:
        directory = Path(server).resolve().parent
        if complete(directory) and not is_su_wrapper(directory / "rabbitmq-server"):
            return directory

    raise InstanceError(
        "RabbitMQ server scripts not found: install the server package "
        "(Debian: rabbitmq-server) or set CLOUDAPI_TEST_RABBITMQ_SBINDIR to the "
        "directory that contains rabbitmq-server and rabbitmqctl"
    )


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0):
            return True
    except OSError:
        return False


class PrivateRabbit:
    """A throwaway RabbitMQ node on private loopback ports.

    The node has its own name, AMQP port, distribution port, Erlang cookie
    and data, log and config directories, so it runs beside the shared node
    ``rabbit@localhost`` and beside other private nodes. Every rabbitmqctl
    call passes ``-n`` with this node's name. Data, node name and ports stay
    the same across ``stop()``, ``restart()`` and ``kill()``, so durable
    queues and persistent messages survive them.
    """

    def __init__(
        self,
        *,
        extra_config: Sequence[str] = (),
        start_timeout: float = 60.0,
        stop_timeout: float = 60.0,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Prepare an instance; nothing runs until start().

        extra_config are extra rabbitmq.conf lines in the sysctl-like format,
        such as ``"consumer_timeout = 10000"``.
        """
        self.sbindir = find_rabbitmq_sbindir()
        self.host = LOOPBACK
        self.node_name = f"cloudapi-test-{secrets.token_hex(4)}@localhost"
        self.port = 0
        self.dist_port = 0
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._extra_config = list(extra_config)
        self._parent_dir = Path(base_dir) if base_dir else Path(tempfile.gettempdir())
        self._base_dir: Path | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._os_pid: int | None = None
        self._ports_confirmed = False
        self._closed = False

    # -- paths ------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        """Temporary directory with HOME, data, logs and config of the node."""
        if self._base_dir is None:
            raise InstanceError("the private RabbitMQ node has not been started yet")
        return self._base_dir

    @property
    def log_path(self) -> Path:
        return self.base_dir / "log" / f"{self.node_name}.log"

    @property
    def output_path(self) -> Path:
        """File with stdout and stderr of rabbitmq-server, where boot failures show."""
        return self.base_dir / "server.out"

    # -- public API ---------------------------------------------------------

    def url(self) -> str:
        """Return the AMQP URL for the default guest user and vhost."""
        if not self.port:
            raise InstanceError("the private RabbitMQ node has not been started yet")
        return f"amqp://guest:guest@{self.host}:{self.port}/"

    @property
    def pid(self) -> int | None:
        """OS pid of the Erlang VM (beam.smp) of a running node, else None."""
        # The VM is a child of the rabbitmq-server script, so while the script
        # runs, the VM's pid cannot have been reused by another process.
        server_alive = self._server is not None and self._server.poll() is None
        if server_alive and self._os_pid is not None and _process_running(self._os_pid):
            return self._os_pid
        return None

    @property
    def is_running(self) -> bool:
        server_alive = self._server is not None and self._server.poll() is None
        return server_alive or self.pid is not None

    def rabbitmqctl(
        self, *args: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run rabbitmqctl against this node only and return the completed process.

        Raises InstanceError on timeout, and on a non-zero exit code when
        check is True.
        """
        command = [str(self.sbindir / "rabbitmqctl"), "-n", self.node_name, *args]
        try:
            result = subprocess.run(
                command,
                env=self._environment(),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            raise InstanceError(
                f"rabbitmqctl {' '.join(args)} timed out after {timeout:g} s on node "
                f"{self.node_name}; node log {self.log_path}:\n{_tail(self.log_path)}"
            ) from error
        if check and result.returncode != 0:
            raise InstanceError(
                f"rabbitmqctl {' '.join(args)} failed with exit code {result.returncode} "
                f"on node {self.node_name}:\n{result.stdout.strip()}\n{result.stderr.strip()}"
            )
        return result

    def start(self) -> None:
        """Start the node, creating its directories on the first call.

        Returns when ``rabbitmqctl await_startup`` succeeds and the AMQP port
        accepts connections. Raises InstanceError after start_timeout seconds
        or when the node exits during boot.
        """
        if self._closed:
            raise InstanceError("this PrivateRabbit was closed and cannot start again")
        if self.is_running:
            raise InstanceError(f"the private RabbitMQ node {self.node_name} is already running")
        if self._base_dir is None:
            self._create_dirs()
            _open_instances.add(self)

        # Until the first successful start, ports taken by another process are
        # replaced by new ones. Afterwards clients rely on the AMQP port.
        attempts = 1 if self._ports_confirmed else 3
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            if self._try_start():
                self._ports_confirmed = True
                log.info(
                    "private RabbitMQ node %s started on %s:%d in %.1f s (pid %s, dir %s)",
                    self.node_name, self.host, self.port, time.monotonic() - started,
                    self._os_pid, self.base_dir,
                )
                return
            if attempt < attempts:
                log.warning(
                    "port %d or %d was taken, retrying on other ports", self.port, self.dist_port
                )
                _release_ports(self.port, self.dist_port)
                self.port = allocate_port()
                self.dist_port = allocate_port()
                self._write_config()
        raise InstanceError(
            f"private RabbitMQ node {self.node_name} could not bind free ports after "
            f"{attempts} attempts; output {self.output_path}:\n{_tail(self.output_path)}"
        )

    def stop(self) -> None:
        """Stop the node gracefully with ``rabbitmqctl stop`` and wait for it to exit.

        Does nothing when the node is not running. Falls back to SIGTERM when
        rabbitmqctl fails, and raises InstanceError when the node still runs
        after stop_timeout seconds.
        """
        if not self.is_running:
            self._reap_server()
            return
        deadline = time.monotonic() + self.stop_timeout
        try:
            # Half the budget, so that the SIGTERM fallback has time too.
            self.rabbitmqctl("stop", timeout=self.stop_timeout / 2)
        except InstanceError as error:
            log.warning("rabbitmqctl stop failed, sending SIGTERM instead: %s", error)
            self._signal_vm(signal.SIGTERM)

        if not self._wait_for_exit(deadline - time.monotonic()):
            raise InstanceError(
                f"private RabbitMQ node {self.node_name} still runs {self.stop_timeout:g} s "
                f"after the stop request; node log {self.log_path}:\n{_tail(self.log_path)}"
            )
        self._reap_server()
        log.info("private RabbitMQ node %s stopped", self.node_name)

    def restart(self) -> None:
        """Stop the node and start it again with the same data, name and ports."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM, as in a crash, and wait for its processes to exit.

        Raises InstanceError when the node is not running or a process
        outlives stop_timeout.

        NOTE: with RabbitMQ 3.10.8, a quorum queue declared on a freshly
        started node seconds before kill() came back leaderless after start()
        (raft state follower, term 0), and basic.get on it hung. A quorum
        queue that existed before a graceful restart recovered, and so did a
        durable classic queue declared just before kill().
        """
        pid = self.pid
        if pid is None:
            raise InstanceError(f"the private RabbitMQ node {self.node_name} is not running")
        os.kill(pid, signal.SIGKILL)
        log.info("private RabbitMQ node %s (pid %d) killed", self.node_name, pid)
        if not self._wait_for_exit(self.stop_timeout):
            raise InstanceError(
                f"processes {_pids_inside(self.base_dir)} of node {self.node_name} still run "
                f"{self.stop_timeout:g} s after SIGKILL"
            )
        self._reap_server()

    def close_connections(self, reason: str = "closed by a fault-injection test") -> None:
        """Force-close every client connection in every vhost of this node.

        Clients see a connection.close with reply code 320 (CONNECTION_FORCED)
        and reason as its text.
        """
        self.rabbitmqctl("close_all_connections", "--global", reason)
        log.info("closed all client connections on node %s: %s", self.node_name, reason)

    def close(self) -> None:
        """Stop the node, kill leftover processes and remove the temporary directory.

        Safe to call more than once, and after a failed start.
        """
        if self._closed:
            return
        self._closed = True
        _open_instances.discard(self)
        if self._base_dir is None:
            return
        try:
            try:
                self.stop()
            except InstanceError:
                log.exception("graceful stop failed, killing private RabbitMQ node instead")
                self._abort()
            _kill_leftovers(self._base_dir)
        finally:
            self._reap_server()
            shutil.rmtree(self._base_dir, ignore_errors=True)
            _release_ports(self.port, self.dist_port)
            log.info("private RabbitMQ node %s closed", self.node_name)

    def __enter__(self) -> PrivateRabbit:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PrivateRabbit(node_name={self.node_name!r}, port={self.port}, "
            f"base_dir={self._base_dir})"
        )

    # -- internals ----------------------------------------------------------

    def _create_dirs(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="cloudapi-rabbit-", dir=self._parent_dir))
        self._base_dir = base
        for name in ("home", "mnesia", "log"):
            (base / name).mkdir()

        # A random cookie keeps this node and its CLI calls apart from the
        # shared node, whose cookie is in /var/lib/rabbitmq.
        cookie = base / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)

        # An empty plugin list keeps the management plugin, and its port
        # 15672, off. An empty env file keeps /etc/rabbitmq/rabbitmq-env.conf,
        # which names the shared node, from being read.
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")

        self.port = allocate_port()
        self.dist_port = allocate_port()
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listeners.tcp.default = {LOOPBACK}:{self.port}",
            "loopback_users.guest = true",
            "log.console = false",
            *self._extra_config,
        ]
        (self.base_dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")

    def _environment(self) -> dict[str, str]:
        base = self.base_dir
        env = _clean_env(["RABBITMQ_", "ERL_"])
        env.update(
            {
                "HOME": str(base / "home"),
                "RABBITMQ_NODENAME": self.node_name,
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
                # Never created: keeps a shared advanced.config from being read.
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
                "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
                # Used only if this node has to start epmd itself.
                "ERL_EPMD_ADDRESS": LOOPBACK,
                # Binds the distribution listener of the node and of the CLI
                # to loopback.
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    def _try_start(self) -> bool:
        """Start the node and return False when one of its ports was already in use."""
        output_size = self.output_path.stat().st_size if self.output_path.exists() else 0
        (self.base_dir / "rabbitmq.pid").unlink(missing_ok=True)
        self._os_pid = None
        with open(self.output_path, "ab") as output:
            # A new session keeps a Ctrl-C in the terminal from reaching the
            # node directly, so close() decides how it stops.
            self._server = subprocess.Popen(
                [str(self.sbindir / "rabbitmq-server")],
                env=self._environment(),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        deadline = time.monotonic() + self.start_timeout
        while True:
            exit_code = self._server.poll()
            if exit_code is not None:
                new_output = self.output_path.read_bytes()[output_size:].decode(errors="replace")
                if "eaddrinuse" in new_output and not self._ports_confirmed:
                    self._abort()
                    return False
                self._abort()
                raise InstanceError(
                    f"rabbitmq-server for node {self.node_name} exited with code {exit_code} "
                    f"during boot; output {self.output_path}:\n{_tail(self.output_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._abort()
                raise InstanceError(
                    f"private RabbitMQ node {self.node_name} did not start within "
                    f"{self.start_timeout:g} s; node log {self.log_path}:\n"
                    f"{_tail(self.log_path)}\noutput:\n{_tail(self.output_path, 10)}"
                )
            # await_startup waits for a node that epmd already lists, but
            # fails at once while the VM has not registered its name yet.
            try:
                result = self.rabbitmqctl(
                    "await_startup", "--timeout", str(max(1, int(remaining))),
                    timeout=remaining + 10, check=False,
                )
            except InstanceError:
                self._abort()
                raise
            if result.returncode == 0:
                break
            time.sleep(0.5)

        if not _wait_until(lambda: _port_accepts(self.port), max(1.0, deadline - time.monotonic())):
            self._abort()
            raise InstanceError(
                f"node {self.node_name} reports it started but port {self.port} does not "
                f"accept connections; node log {self.log_path}:\n{_tail(self.log_path)}"
            )
        self._os_pid = self._read_pid_file()
        return True

    def _read_pid_file(self) -> int:
        pid_file = self.base_dir / "rabbitmq.pid"
        try:
            return int(pid_file.read_text().strip())
        except (OSError, ValueError) as error:
            raise InstanceError(
                f"node {self.node_name} started but its pid file {pid_file} is "
                f"missing or invalid: {error}"
            ) from error

    def _signal_vm(self, signum: signal.Signals) -> None:
        pid = self.pid
        if pid is not None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _wait_for_exit(self, timeout: float) -> bool:
        """Wait for rabbitmq-server and every process in base_dir to exit."""
        deadline = time.monotonic() + max(0.0, timeout)
        if self._server is not None:
            try:
                self._server.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return _wait_until(
            lambda: not _pids_inside(self.base_dir), max(0.0, deadline - time.monotonic())
        )

    def _abort(self) -> None:
        """SIGKILL the wrapper script and every process of the node, then reap."""
        if self._server is not None and self._server.poll() is None:
            self._server.kill()
        _kill_leftovers(self.base_dir)
        self._reap_server()

    def _reap_server(self) -> None:
        if self._server is not None:
            try:
                self._server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("rabbitmq-server wrapper %d did not exit", self._server.pid)
                return
            self._server = None
        self._os_pid = None
