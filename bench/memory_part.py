"""Part 4, memory: resident memory (VmRSS) of one API process holding the 100,000-image
read model, with the default cache (CACHE_MAX_IMAGES=100000, the whole read model) and
with a fifth of it (CACHE_MAX_IMAGES=20000).

Per setting and repetition, the part starts the service with one process. The coverage
pass sends one signed request per image of the read model, in random order, so every
image goes through the cache. Images that no bench account may see get 404 responses
and are cached too. A measured wrk run over the visible images follows, then the part
reads VmRSS and VmHWM (the peak) from /proc/PID/status.
"""

from __future__ import annotations

import asyncio

import asyncpg

from bench import config, servers, signing, wrk
from bench.context import Context
from bench.processes import ProcessGroup, memory_kib

SETTINGS = (("default cache", {}), ("CACHE_MAX_IMAGES=20000", {"CACHE_MAX_IMAGES": "20000"}))
_COVERAGE_MAX_SECONDS = 120  # one wrk run of the coverage pass; a slower server gets several


async def _all_images() -> list[str]:
    connection = await asyncpg.connect(config.database_url())
    try:
        return [row[0] for row in await connection.fetch("SELECT uuid::text FROM images WHERE NOT deleted")]
    finally:
        await connection.close()


def _cover(ctx: Context, url: str, request_file: signing.RequestFile, tag: str) -> dict:
    """Send every request of `request_file` once; return the summed counts."""
    rate = ctx.rates.get(("service", 1), 3000.0)
    sent = 0
    status_errors = 0
    seconds = 0.0
    while sent < request_file.count:
        duration = min(_COVERAGE_MAX_SECONDS, max(5, int((request_file.count - sent) / rate * 1.2) + 1))
        figures = wrk.run(url, str(request_file.path), duration, offset=sent, log_name=f"memory-cover{tag}")
        sent += figures["issued"]
        status_errors += figures["status_errors"]
        seconds += figures["seconds"]
        rate = max(figures["rps"], 100.0)
    return {"sent": sent, "status_errors": status_errors, "seconds": seconds}


def run(ctx: Context) -> None:
    print(f"== memory: coverage pass over the read model, then {ctx.profile.http_seconds} s of wrk, "
          f"{ctx.runs} repetitions", flush=True)
    images = asyncio.run(_all_images())
    results = ctx.results
    url = f"http://127.0.0.1:{ctx.port}"
    for rep in range(ctx.runs):
        for label, env in SETTINGS:
            # Each file is signed right before its run, so that its Dates stay inside the
            # clock skew window on a slow machine too. There, signing the load file
            # took 90 s, and a coverage file signed before it expired during the pass.
            cover_file = signing.generate_coverage(ctx.accounts, ctx.visible, images, f"memory-cover-{rep}",
                                                   ctx.next_seed())
            print(f"  {label}, repetition {rep + 1}: signed {cover_file.count:,} coverage requests "
                  f"in {cover_file.seconds:.1f} s", flush=True)
            group = ProcessGroup()
            tag = f"-{'default' if not env else 'all'}-r{rep}"
            try:
                started = servers.start(group, "service", 1, ctx.port, env, tag=f"-memory{tag}")
                pid = servers.api_pids("service", started)[0]
                after_start = memory_kib(pid)
                coverage = _cover(ctx, url, cover_file, tag)
                after_cover = memory_kib(pid)
                # Signed while the service waits, so the load run finds the process as the pass
                # left it. The pass's own rate sizes the file when the HTTP part did not run.
                rate = max(ctx.rates.get(("service", 1), 0.0), coverage["sent"] / max(coverage["seconds"], 1.0), 4000.0)
                load_count = int(rate * 2.5 * (ctx.profile.http_seconds + 2)) + 2000
                load_file = signing.generate(ctx.accounts, ctx.visible, load_count, f"memory-load-{rep}",
                                             ctx.next_seed())
                print(f"    signed {load_file.count:,} load requests in {load_file.seconds:.1f} s", flush=True)
                figures = wrk.run(url, str(load_file.path), ctx.profile.http_seconds, log_name=f"memory-load{tag}")
                after_load = memory_kib(pid)
                helpers = [memory_kib(helper) for helper in servers.helper_pids(pid)]
            finally:
                group.stop_all()
            rss_mb = after_load["VmRSS"] / 1024
            results.add("memory", f"{label} rss", rss_mb)
            results.add("memory", f"{label} hwm", after_load["VmHWM"] / 1024)
            results.add("memory", f"{label} rps", figures["rps"])
            if helpers:
                results.add("memory", f"{label} helper rss", sum(helper["VmRSS"] for helper in helpers) / 1024)
            results.record(part="memory", setting=label, rep=rep, start_kib=after_start, cover_kib=after_cover,
                           load_kib=after_load, helper_kib=helpers, coverage=coverage, expected_404=cover_file.expected_errors,
                           load=figures)
            print(f"    RSS {after_start['VmRSS'] / 1024:.0f} MB at start, {after_cover['VmRSS'] / 1024:.0f} MB "
                  f"after {coverage['sent']:,} coverage requests, {rss_mb:.0f} MB after the load run "
                  f"({figures['rps']:,.0f} req/s, p99 {figures['p99_ms']:.1f} ms)"
                  + "".join(f"; signature helper {helper['VmRSS'] / 1024:.0f} MB" for helper in helpers), flush=True)
            # The last wrk run of the pass goes past the end of the file and starts over, so
            # the 404 responses to hidden images are expected in proportion to what was sent.
            expected = cover_file.expected_errors * coverage["sent"] / cover_file.count
            if abs(coverage["status_errors"] - expected) > 0.1 * expected + 10:
                results.note(f"memory {label} repetition {rep + 1}: {coverage['status_errors']} non-2xx answers "
                             f"in the coverage pass, about {expected:.0f} expected (hidden images)")
            if figures["status_errors"] or figures["wraps"]:
                results.note(f"memory {label} repetition {rep + 1}: load run had {figures['status_errors']} "
                             f"non-2xx answers and wrapped {figures['wraps']} times")
    for label, _ in SETTINGS:
        target = "<= 100" if label == "default cache" else ""
        results.row("memory", f"API RSS, {label}", "MB", results.get("memory", f"{label} rss"), target)
        results.row("memory", f"API peak RSS (VmHWM), {label}", "MB", results.get("memory", f"{label} hwm"))
        if results.get("memory", f"{label} helper rss"):
            results.row("memory", f"signature helper RSS, {label}", "MB", results.get("memory", f"{label} helper rss"))
        results.row("memory", f"service throughput after coverage, {label}", "req/s",
                    results.get("memory", f"{label} rps"))
