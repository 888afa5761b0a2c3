"""The parent process of a multi-process API (`HTTP_PROCESSES` > 1).

The parent starts the children (each binds the API port with SO_REUSEPORT and serves
requests), serves their aggregated metrics on `METRICS_PORT`, and waits:

- on SIGTERM or SIGINT it forwards the signal to every child, waits for them to drain
  and exit, and exits 0 when they all stopped cleanly;
- when a child exits on its own (a crash, the OOM killer) it stops the others the same
  way and exits 1. The orchestrator then restarts the whole set, rather than the pod
  serving on with fewer processes than configured.

Metrics use the library's multiprocess mode: the children write to files in
`PROMETHEUS_MULTIPROC_DIR` (a new temporary directory when the variable is unset), the
parent clears the directory before they start and drops the gauges of a child that
exited. One port for the whole pod keeps a single scrape target per pod, which is what
the `prometheus.io/port` annotation can express.

NOTE: a parent killed with SIGKILL cannot stop its children, which then serve on. In a
container that does not matter, because the container ends with its first process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.metrics import clear_multiprocess_dir, start_metrics_server
from service.settings import Settings

log = structlog.get_logger("api")

# Seconds the children get beyond HTTP_DRAIN_TIMEOUT to close their pools (up to 5 s)
# and exit; past that the parent kills them.
_EXIT_GRACE = 10.0

# Exit codes of a child that stopped as asked: it ran its shutdown, or the signal
# arrived before it had installed its handlers.
_CLEAN_EXITS = (0, -signal.SIGTERM, -signal.SIGINT)


def supervise(settings: Settings, target: Callable[[Settings], None]) -> int:
    """Run `settings.http_processes` children of `target(settings)`; return an exit status."""
    metrics_dir = None
    temporary = False
    if settings.metrics_port:
        metrics_dir = settings.prometheus_multiproc_dir
        if metrics_dir:
            clear_multiprocess_dir(metrics_dir)
        else:
            metrics_dir = tempfile.mkdtemp(prefix="cloudapi-images-metrics-")
            temporary = True
        # The library picks its multiprocess mode when it is imported, from this
        # variable; spawned children inherit the environment, so they all see it.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        settings = dataclasses.replace(settings, prometheus_multiproc_dir=metrics_dir)
    try:
        return asyncio.run(_Supervisor(settings, target, metrics_dir).run())
    finally:
        if temporary:
            shutil.rmtree(metrics_dir, ignore_errors=True)


class _Supervisor:
    def __init__(self, settings: Settings, target: Callable[[Settings], None], metrics_dir: str | None):
        self._settings = settings
        self._metrics_dir = metrics_dir
        context = multiprocessing.get_context("spawn")
        self._children: list[BaseProcess] = [
            context.Process(target=target, args=(settings,), name=f"api-{index}")
            for index in range(settings.http_processes)
        ]
        self._exited: asyncio.Queue[BaseProcess] = asyncio.Queue()
        self._signals: asyncio.Queue[int] = asyncio.Queue()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._signals.put_nowait, signum)

        metrics_runner = None
        if self._metrics_dir is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._metrics_dir)
            metrics_runner = await start_metrics_server(
                registry, self._settings.http_host, self._settings.metrics_port
            )
        try:
            for child in self._children:
                child.start()
                loop.add_reader(child.sentinel, self._on_exit, child)
            log.info(
                "api_processes_started",
                pids=[child.pid for child in self._children],
                port=self._settings.http_port,
                metrics_port=self._settings.metrics_port or None,
                pid=os.getpid(),
            )
            return await self._wait_and_stop()
        finally:
            if metrics_runner is not None:
                await metrics_runner.cleanup()

    def _on_exit(self, child: BaseProcess) -> None:
        asyncio.get_running_loop().remove_reader(child.sentinel)
        # The sentinel turns readable as the child closes its files, a moment before the
        # kernel has its exit status: join() blocks for that moment, not longer.
        child.join()
        if self._metrics_dir is not None:
            mark_process_dead(child.pid, self._metrics_dir)
        self._exited.put_nowait(child)

    async def _wait_and_stop(self) -> int:
        signal_wait = asyncio.ensure_future(self._signals.get())
        exit_wait = asyncio.ensure_future(self._exited.get())
        await asyncio.wait({signal_wait, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
        running = set(self._children)
        status = 0
        if signal_wait.done():
            exit_wait.cancel()
            signum = signal_wait.result()
            log.info("api_processes_stopping", reason=signal.Signals(signum).name, pid=os.getpid())
        else:
            signal_wait.cancel()
            child = exit_wait.result()
            running.discard(child)
            status = 1
            signum = signal.SIGTERM
            log.error(
                "api_process_exited",
                child_pid=child.pid,
                exit_code=child.exitcode,
                expected=False,
                pid=os.getpid(),
            )
            log.info("api_processes_stopping", reason="process_exited", pid=os.getpid())

        for child in running:
            _signal(child, signum)
        deadline = self._settings.http_drain_timeout + _EXIT_GRACE
        try:
            async with asyncio.timeout(deadline):
                while running:
                    child = await self._exited.get()
                    running.discard(child)
                    clean = child.exitcode in _CLEAN_EXITS
                    if not clean:
                        status = 1
                    log.info("api_process_exited", child_pid=child.pid, exit_code=child.exitcode, expected=clean, pid=os.getpid())
        except TimeoutError:
            status = 1
            for child in running:
                log.error("api_process_killed", child_pid=child.pid, waited_seconds=deadline, pid=os.getpid())
                _signal(child, signal.SIGKILL)
                child.join(_EXIT_GRACE)
        log.info("api_processes_stopped", exit_code=status, pid=os.getpid())
        return status


def _signal(child: BaseProcess, signum: int) -> None:
    try:
        os.kill(child.pid, signum)
    except ProcessLookupError:
        pass  # it has just exited; its exit is collected from its sentinel
