"""Optional part `profile`: where one API process spends its time under the HTTP load.

Starts the service with one process and its defaults, sends the same wrk load as the
HTTP part, and samples the process with py-spy (`py-spy record --format raw`, 200
samples a second, idle frames left out) during the measured run. Prints the functions
with the largest share of samples, inclusive (the function and what it calls) and self.
py-spy slows the process it samples, so this part reports shares, never throughput.
py-spy comes from PyPI: `.venv/bin/pip install py-spy`.
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

from bench import config, servers, signing, wrk
from bench.context import Context
from bench.processes import BenchError, ProcessGroup

_TOP = 30


def _py_spy() -> str:
    local = config.ROOT / ".venv" / "bin" / "py-spy"
    if local.exists():
        return str(local)
    found = shutil.which("py-spy")
    if found is None:
        raise BenchError("py-spy is not installed; install it with: .venv/bin/pip install py-spy")
    return found


def summarize(collapsed: Path) -> str:
    """Return tables of inclusive and self sample shares from py-spy's raw (collapsed) output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count

    if not total:
        return "py-spy recorded no samples"
    by_file: collections.Counter[str] = collections.Counter()
    for frame, count in inclusive.items():
        # "function (path/file.py:line)" -> "path/file.py"; the largest share per file is
        # its inclusive share, since nested calls within a file are counted once per stack.
        location = frame.rpartition("(")[2].rstrip(")").rpartition(":")[0]
        by_file[location] = max(by_file[location], count)

    lines = [f"{total} samples (idle time of the event loop is not sampled)", "",
             "inclusive share by source file (largest function of the file):"]
    lines += [f"  {100 * count / total:5.1f} %  {location}" for location, count in by_file.most_common(_TOP)
              if location.startswith(("service/", "workers/", "aiohttp/", "asyncpg/", "structlog/", "cryptography/"))]
    lines += ["", "inclusive share (function and its callees):"]
    lines += [f"  {100 * count / total:5.1f} %  {frame}" for frame, count in inclusive.most_common(_TOP)]
    lines += ["", "self share (the function's own code):"]
    lines += [f"  {100 * count / total:5.1f} %  {frame}" for frame, count in own.most_common(_TOP)]
    return "\n".join(lines)


def run(ctx: Context) -> None:
    py_spy = _py_spy()
    seconds = ctx.profile.http_seconds
    print(f"== profile: py-spy on one API process for {seconds} s of wrk load", flush=True)
    rate = ctx.rates.get(("service", 1), 4000.0)
    request_file = signing.generate(ctx.accounts, ctx.visible, int(rate * (seconds + ctx.profile.warmup_seconds + 4) * 1.4)
                                    + 2000, "profile", ctx.next_seed())
    output = config.STATE_DIR / "profile" / "service-1p.collapsed.txt"
    output.parent.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup()
    url = f"http://127.0.0.1:{ctx.port}"
    try:
        started = servers.start(group, "service", 1, ctx.port, tag="-profile")
        pid = servers.api_pids("service", started)[0]
        warmup = wrk.run(url, str(request_file.path), ctx.profile.warmup_seconds, log_name="profile-warmup")
        sampler = group.start("py-spy", [py_spy, "record", "--format", "raw", "--rate", "200", "--duration",
                                         str(seconds), "--pid", str(pid), "--output", str(output)])
        figures = wrk.run(url, str(request_file.path), seconds + 2, offset=warmup["issued"], log_name="profile")
        if sampler.popen.wait(30) != 0:
            raise BenchError(f"py-spy failed; its log ({sampler.log_path}) ends with:\n{sampler.tail()}")
    finally:
        group.stop_all()
    summary = summarize(output)
    (output.parent / "service-1p.summary.txt").write_text(summary + "\n")
    print(f"  under py-spy: {figures['rps']:,.0f} req/s (slowed by sampling)\n{summary}\n"
          f"  collapsed stacks: {output} (flamegraph.pl or speedscope read them)", flush=True)
    ctx.results.record(part="profile", load=figures, summary=summary)
