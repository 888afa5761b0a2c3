"""Command line of the benchmark suite: `bench/run [--part PART] [--quick] [--runs N]`."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import time

from bench import config, dataset, report
from bench.context import DEFAULT_FRESHNESS_LOAD, Context
from bench.processes import BenchError, require_free_port

PARTS = ("http", "freshness", "worker", "memory")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark the service against baselines measured in the same session; "
                    "see docs/benchmarks.md.")
    parser.add_argument("--part", action="append", choices=PARTS + ("profile",),
                        help="run only this part (repeatable; default: http, freshness, worker, memory; "
                             "'profile' samples one API process under load with py-spy)")
    parser.add_argument("--quick", action="store_true",
                        help="short runs (3 s HTTP, 8 s freshness, 10,000 worker events) and 1 repetition")
    parser.add_argument("--runs", type=int, help="repetitions of every measurement (default 3, or 1 with --quick)")
    parser.add_argument("--processes", default=(1, 2), type=_process_counts,
                        help="API process counts of the HTTP part, comma-separated (default 1,2)")
    parser.add_argument("--port", type=_port, default=18080,
                        help="port of the servers under test (default 18080); the service's metrics use this "
                             "port plus 1000")
    parser.add_argument("--worker-port", type=_port, default=18091,
                        help="first health port of the workers (default 18091; two workers use it and the next)")
    parser.add_argument("--unique-baselines", action="store_true",
                        help="sign a file large enough for each baseline run too, so no signature repeats "
                             "there either (adds minutes of signing)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--freshness-load", type=_load_fraction,
                      help="HTTP load of the freshness part, as a fraction of the service's 1-process peak, "
                           f"above 0 and at most 1 (default {DEFAULT_FRESHNESS_LOAD:g})")
    load.add_argument("--freshness-rate", type=_positive_rate,
                      help="HTTP load of the freshness part in requests/s, at least 1, instead of a fraction "
                           "of the peak, to compare runs at the same load")
    parser.add_argument("--reset-data", action="store_true", help="reload the 100,000 images of the bench database")
    return parser


def _process_counts(text: str) -> tuple[int, ...]:
    """Parse the comma-separated process counts of --processes, such as "1,2"."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid process counts {text!r}: expected numbers such as 1,2") from None
    if any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(f"invalid process counts {text!r}: each must be at least 1")
    return counts


def _bounded_number(kind: str, accepts, expected: str):
    """Return an argparse type that parses a number and rejects it unless `accepts(number)`."""

    def parse(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if not accepts(number):
            raise argparse.ArgumentTypeError(f"invalid {kind} {text!r}: expected {expected}")
        return number

    return parse


_port_number = _bounded_number("port", lambda port: port.is_integer() and 1 <= port <= 65535,
                               "a whole number from 1 to 65535, such as 18080")


def _port(text: str) -> int:
    return int(_port_number(text))


def _port_conflict(port: int, worker_port: int) -> str | None:
    """Return why the ports the suite derives from --port and --worker-port cannot be
    used together, or None when they can."""
    ports = {"--port": port, "the metrics port (--port + 1000)": port + 1000,
             "--worker-port": worker_port, "the second worker's port (--worker-port + 1)": worker_port + 1}
    for name, value in ports.items():
        if value > 65535:
            return f"invalid ports: {name} would be {value}, above 65535. Choose a lower --port or --worker-port"
    names = list(ports)
    for index, first in enumerate(names):
        for second in names[index + 1:]:
            if ports[first] == ports[second]:
                return (f"invalid ports: {first} and {second} are both {ports[first]}. "
                        "Choose a --worker-port away from --port and --port + 1000")
    return None


# --freshness-rate: requests per second. --freshness-load: a fraction of the peak.
_positive_rate = _bounded_number("rate", lambda rate: 1 <= rate < float("inf"),
                                 "requests per second, at least 1, such as 8000")
_load_fraction = _bounded_number("fraction", lambda fraction: 0 < fraction <= 1,
                                 "a number above 0 and at most 1, such as 0.5")


def _machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as meminfo:
        memory_gib = int(meminfo.readline().split()[1]) / 1024 / 1024
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({model}), {memory_gib:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}; load average {load}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    profile = config.Profile.quick() if args.quick else config.Profile.full()
    runs = args.runs
    if runs is None:
        runs = 1 if args.quick else 3
    if runs < 1:
        print("bench/run: --runs must be at least 1", file=sys.stderr)
        return 2
    parts = args.part or list(PARTS)
    conflict = _port_conflict(args.port, args.worker_port)
    if conflict:
        print(f"bench/run: {conflict}", file=sys.stderr)
        return 2
    if (args.freshness_load is not None or args.freshness_rate is not None) and "freshness" not in parts:
        print("bench/run: --freshness-load and --freshness-rate apply to the freshness part only; "
              "add --part freshness or leave them out", file=sys.stderr)
        return 2
    command = "bench/run " + " ".join(shlex.quote(arg) for arg in (argv if argv is not None else sys.argv[1:]))
    results = report.Results()
    print(f"{command}\nmachine: {_machine()}\nprofile: {profile.name}, {runs} repetition(s)", flush=True)
    try:
        if set(parts) & {"http", "freshness", "memory", "profile"}:
            from bench import wrk

            wrk.require_wrk()
            require_free_port(args.port)
        accounts = dataset.prepare(reset=args.reset_data)
        ctx = Context(profile=profile, runs=runs, port=args.port, worker_port=args.worker_port, accounts=accounts,
                      visible=dataset.visibility(), results=results, unique_baselines=args.unique_baselines,
                      freshness_load=DEFAULT_FRESHNESS_LOAD if args.freshness_load is None else args.freshness_load,
                      freshness_rate=args.freshness_rate,
                      process_counts=args.processes)
        asyncio.run(dataset.vacuum())
        try:
            _run_parts(ctx, parts)
        finally:
            if set(parts) & {"freshness", "worker"}:
                from bench import worker_part

                dead_letters = asyncio.run(worker_part.cleanup())
                for queue, messages in dead_letters.items():
                    if messages:
                        results.note(f"{queue} held {messages} dead-lettered messages")
    except BenchError as exc:
        print(f"bench/run: {exc}", file=sys.stderr)
        return 1
    finally:
        if results.rows:
            report.note_slow_machine(results)
            print("\n" + report.format_table(results.rows))
            for text in results.notes:
                print(f"note: {text}")
            print(f"\nmachine at the end: {_machine()}")
            print(f"raw figures: {results.save(command)}")
    return 0


def _run_parts(ctx: Context, parts: list[str]) -> None:
    started = time.monotonic()
    if "http" in parts:
        from bench import http_part

        http_part.run(ctx)
    if "freshness" in parts:
        from bench import freshness_part

        freshness_part.run(ctx)
    if "worker" in parts:
        from bench import worker_part

        worker_part.run(ctx)
    if "memory" in parts:
        from bench import memory_part

        memory_part.run(ctx)
    if "profile" in parts:
        from bench import profile_part

        profile_part.run(ctx)
    print(f"parts took {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
