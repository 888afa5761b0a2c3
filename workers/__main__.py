"""Command line of the workers: `python -m workers [run|seed FILE...|publish FILE...]`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from service import logs, settings as settings_module


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workers",
        description="Consume image and account events into the read model, or publish events.",
        epilog="Settings come from environment variables:\n" + settings_module.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="consume events until SIGTERM (the default)")
    seed = commands.add_parser("seed", help="publish IMGAPI manifests (JSON Lines) as lifecycle events")
    seed.add_argument("files", nargs="+", type=Path, metavar="FILE.jsonl")
    return parser


async def _run(settings: settings_module.Settings) -> int:
    from workers.consumer import Worker, run_worker
    from workers.health import start_health_server

    worker = Worker(settings)
    health = None
    if settings.worker_http_port:
        health = await start_health_server(worker, settings.worker_http_host, settings.worker_http_port)
    try:
        return await run_worker(settings, worker)
    finally:
        if health is not None:
            await health.cleanup()


async def _seed(settings: settings_module.Settings, files: list[Path]) -> int:
    import structlog

    from workers.producer import EventPublisher
    from workers.seed import seed_events

    events = seed_events(files)
    async with EventPublisher.connect(settings) as publisher:
        count = await publisher.publish_many(events)
    images = len({event["image_uuid"] for event in events})
    structlog.get_logger("seed").info("seed_published", events=count, images=images, files=[str(f) for f in files])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_module.Settings.from_env()
    except settings_module.SettingsError as exc:
        print(f"python -m workers: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)

    if args.command == "seed":
        from workers.seed import SeedError

        try:
            return asyncio.run(_seed(settings, args.files))
        except (SeedError, OSError) as exc:
            print(f"python -m workers seed: {exc}", file=sys.stderr)
            return 1

    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass
    return asyncio.run(_run(settings))


if __name__ == "__main__":
    sys.exit(main())
