"""Part 1, HTTP: authenticated GetImage on the service against two baselines.

For each process count (1, then 2) and each repetition, three servers run one after
the other on the same port, in an order rotated by repetition. They are (a) bare aiohttp
with a fixed body, (b) aiohttp + asyncpg with one query per request, and the service
with its defaults. Each gets a warm-up, then the measured run, both
`wrk -t1 -c64 --latency` with bench/requests.lua. The measured run starts where the warm-up stopped in the
request file, so none of its requests was sent before.

Request files are signed right before the repetition that uses them. By default only the
service gets a file large enough that no signature repeats in its run. The baselines
never read the Authorization header, so they cycle through the same file. With
`--unique-baselines` each baseline run gets its own file as large as its rate needs.
"""

from __future__ import annotations

import statistics

from bench import config, servers, signing, wrk
from bench.context import Context
from bench.processes import BenchError, ProcessGroup, memory_kib
from bench.report import ratios

# First guesses of requests/s, before this session measured the real ones.
_INITIAL_RATES = {"bare": 30000.0, "naive": 6000.0, "service": 4000.0}
_SIZE_MARGIN = 1.4  # request file size over the expected number of requests
_RUN_OVERHEAD = 20  # seconds to start and stop a server around its runs


def _wanted(ctx: Context, kind: str, processes: int) -> int:
    rate = ctx.rates.get((kind, processes)) or _INITIAL_RATES[kind] * processes
    seconds = ctx.profile.warmup_seconds + ctx.profile.http_seconds
    return int(rate * seconds * _SIZE_MARGIN) + 2000


def _generate(ctx: Context, count: int, name: str) -> signing.RequestFile:
    request_file = signing.generate(ctx.accounts, ctx.visible, count, name, ctx.next_seed())
    print(f"  signed {request_file.count:,} requests in {request_file.seconds:.1f} s "
          f"({request_file.count / request_file.seconds:,.0f}/s)", flush=True)
    ctx.results.record(part="signing", count=request_file.count, seconds=request_file.seconds)
    return request_file


def measure(ctx: Context, kind: str, processes: int, request_file: signing.RequestFile, tag: str,
            extra_env: dict[str, str] | None = None) -> dict:
    """Start `kind`, warm it up, measure it, stop it; return wrk's figures and the API RSS."""
    seconds_needed = ctx.profile.warmup_seconds + ctx.profile.http_seconds + _RUN_OVERHEAD
    if request_file.remaining() < seconds_needed:
        raise BenchError(f"{request_file.path} would leave the 300 s clock skew window during the run")
    group = ProcessGroup()
    url = f"http://127.0.0.1:{ctx.port}"
    try:
        started = servers.start(group, kind, processes, ctx.port, extra_env, tag=tag)
        warmup = wrk.run(url, str(request_file.path), ctx.profile.warmup_seconds, log_name=f"{kind}-{processes}p{tag}-warmup")
        figures = wrk.run(url, str(request_file.path), ctx.profile.http_seconds, offset=warmup["issued"],
                          log_name=f"{kind}-{processes}p{tag}")
        figures["rss_kib"] = [memory_kib(pid)["VmRSS"] for pid in servers.api_pids(kind, started)]
        figures["warmup_issued"] = warmup["issued"]
    finally:
        group.stop_all()
    figures["repeated_signatures"] = figures["wraps"] > 0 or figures["warmup_issued"] + figures["issued"] > figures["file_count"]
    return figures


def run(ctx: Context) -> None:
    profile = ctx.profile
    print(f"== HTTP: wrk -t{config.WRK_THREADS} -c{config.WRK_CONNECTIONS}, {profile.warmup_seconds} s warm-up, "
          f"{profile.http_seconds} s measured, {ctx.runs} repetitions", flush=True)
    for processes in ctx.process_counts:
        for rep in range(ctx.runs):
            order = list(servers.KINDS[rep % 3:] + servers.KINDS[:rep % 3])
            shared = _generate(ctx, _wanted(ctx, "service", processes), f"http-{processes}p-{rep}")
            for kind in order:
                figures = _measure_kind(ctx, kind, processes, rep, shared)
                _store(ctx, kind, processes, rep, figures)
    _rows(ctx)


def _measure_kind(ctx: Context, kind: str, processes: int, rep: int, shared: signing.RequestFile) -> dict:
    unique = kind == "service" or ctx.unique_baselines
    request_file = shared
    if unique and kind != "service":
        request_file = _generate(ctx, _wanted(ctx, kind, processes), f"http-{kind}-{processes}p-{rep}")
    seconds_needed = ctx.profile.warmup_seconds + ctx.profile.http_seconds + _RUN_OVERHEAD
    if request_file.remaining() < seconds_needed:
        request_file = _generate(ctx, _wanted(ctx, "service", processes), f"http-{processes}p-{rep}-again")
    print(f"  {servers.LABELS[kind]}, {processes} process(es), repetition {rep + 1}", flush=True)
    figures = measure(ctx, kind, processes, request_file, tag=f"-r{rep}")
    if unique and figures["repeated_signatures"]:
        # The file was too small for this rate: sign a larger one and measure again, once.
        ctx.rates[(kind, processes)] = max(ctx.rates.get((kind, processes), 0), figures["rps"])
        request_file = _generate(ctx, _wanted(ctx, kind, processes), f"http-{kind}-{processes}p-{rep}-larger")
        figures = measure(ctx, kind, processes, request_file, tag=f"-r{rep}b")
    ctx.rates[(kind, processes)] = max(ctx.rates.get((kind, processes), 0), figures["rps"])
    return figures


def measure_peak(ctx: Context, processes: int) -> dict:
    """Measure the service once at its peak, for a part that needs the peak when the HTTP
    part did not run. As in the HTTP part, a request file that wrapped is signed again,
    larger, and the run repeated once. A second wrap gets a note under the table."""
    request_file = _generate(ctx, _wanted(ctx, "service", processes), f"peak-{processes}p")
    figures = measure(ctx, "service", processes, request_file, tag="-peak")
    if figures["repeated_signatures"]:
        ctx.rates[("service", processes)] = max(ctx.rates.get(("service", processes), 0), figures["rps"])
        request_file = _generate(ctx, _wanted(ctx, "service", processes), f"peak-{processes}p-larger")
        figures = measure(ctx, "service", processes, request_file, tag="-peak-b")
        if figures["repeated_signatures"]:
            ctx.results.note(f"service peak run, {processes} process(es): the request file wrapped, "
                             "so signatures repeated")
    ctx.rates[("service", processes)] = max(ctx.rates.get(("service", processes), 0), figures["rps"])
    return figures


def _store(ctx: Context, kind: str, processes: int, rep: int, figures: dict) -> None:
    results = ctx.results
    part = f"HTTP {processes}p"
    results.add(part, f"{kind} rps", figures["rps"])
    results.add(part, f"{kind} p50", figures["p50_ms"])
    results.add(part, f"{kind} p99", figures["p99_ms"])
    results.record(part="http", kind=kind, processes=processes, rep=rep, **figures)
    print(f"    {figures['rps']:,.0f} req/s, p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms, "
          f"{figures['requests']:,} requests, RSS {[round(k / 1024) for k in figures['rss_kib']]} MB", flush=True)
    if figures["status_errors"] or figures["socket_errors"]:
        results.note(f"{part} {kind} repetition {rep + 1}: {figures['status_errors']} answers were not 2xx/3xx "
                     f"and {figures['socket_errors']} socket errors (see .bench/logs)")
    if figures["repeated_signatures"] and (kind == "service" or ctx.unique_baselines):
        results.note(f"{part} {kind} repetition {rep + 1}: the request file wrapped, so signatures repeated")


def _rows(ctx: Context) -> None:
    results = ctx.results
    for processes in ctx.process_counts:
        part = f"HTTP {processes}p"
        for kind in servers.KINDS:
            results.row(part, f"{servers.LABELS[kind]} throughput", "req/s", results.get(part, f"{kind} rps"))
        for kind in servers.KINDS:
            target = "<= 10" if kind == "service" else ""
            results.row(part, f"{servers.LABELS[kind]} p50", "ms", results.get(part, f"{kind} p50"))
            results.row(part, f"{servers.LABELS[kind]} p99", "ms", results.get(part, f"{kind} p99"), target)
        service = results.get(part, "service rps")
        results.row(part, "service / (b)", "x", ratios(service, results.get(part, "naive rps")), ">= 1.70")
        results.row(part, "service / (a)", "x", ratios(service, results.get(part, "bare rps")), ">= 0.45")
        if service:
            ctx.service_peak[processes] = statistics.median(service)
