"""Command line of the workers: `python -m workers [run|seed FILE...|publish FILE...]`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

# structlog imports rich when it is installed (the test tools bring it), and would then
# render tracebacks with rich, which shows local variables. The commands never use rich,
# so its import fails here, before structlog's; that also saves about 4 MB per process.
sys.modules.setdefault("rich", None)

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
    publish = commands.add_parser("publish", help="publish events (JSON Lines, one complete event per line)")
    publish.add_argument("files", nargs="+", type=Path, metavar="FILE.jsonl")
    publish.add_argument(
        "--skip-invalid", action="store_true", help="publish the valid lines even if some are invalid (default: publish nothing)"
    )
    publish.add_argument("--correlation-id", help="correlation id set on every message, for the logs")
    rebuild = commands.add_parser("rebuild", help="recompute the read model from the event log and swap it in")
    rebuild.add_argument("--check", action="store_true", help="compare with the live table only; change nothing")
    letters = commands.add_parser("dead-letters", help="inspect or replay the dead-letter queue")
    letter_actions = letters.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (
        ("list", "print each dead letter's reason (JSON lines) and leave it in the queue"),
        ("replay", "publish dead letters again to the event exchange and remove them"),
    ):
        action = letter_actions.add_parser(name, help=text)
        action.add_argument("--reason", help="only dead letters with this x-rejection-reason (or RabbitMQ reason)")
        action.add_argument("--limit", type=int, help="at most this many")
        action.add_argument(
            "--message-id", action="append", dest="message_ids", metavar="ID", help="only the dead letter with this message id (repeatable)"
        )
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
        logs.flush()


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


async def _publish(settings: settings_module.Settings, files: list[Path], skip_invalid: bool, correlation_id: str | None) -> int:
    import orjson

    from workers.contract import InvalidEvent, decode
    from workers.producer import EventPublisher

    events, problems = [], []
    for path in files:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    decode(line.strip(), max_bytes=settings.event_max_bytes)
                except InvalidEvent as exc:
                    problems.append(f"{path}:{number}: {exc.reason}: {exc.detail}")
                    continue
                events.append(orjson.loads(line))
    for problem in problems:
        print(f"python -m workers publish: invalid event at {problem}", file=sys.stderr)
    if problems and not skip_invalid:
        print(f"python -m workers publish: {len(problems)} invalid lines; nothing published (see --skip-invalid)", file=sys.stderr)
        return 1
    async with EventPublisher.connect(settings) as publisher:
        for event in events:
            await publisher.publish(event, correlation_id=correlation_id)
    noun = "event" if len(events) == 1 else "events"
    print(f"published {len(events)} {noun}" + (f", skipped {len(problems)} invalid lines" if problems else ""))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_module.Settings.from_env()
    except settings_module.SettingsError as exc:
        print(f"python -m workers: {exc}", file=sys.stderr)
        return 2
    # A worker logs a line per event, so it writes its log in batches.
    logs.configure(settings.log_format, settings.log_level, buffered=args.command in (None, "run"))

    if args.command == "seed":
        from workers.seed import SeedError

        try:
            return asyncio.run(_seed(settings, args.files))
        except (SeedError, OSError) as exc:
            print(f"python -m workers seed: {exc}", file=sys.stderr)
            return 1

    if args.command == "publish":
        from workers.producer import PublishFailed

        try:
            return asyncio.run(_publish(settings, args.files, args.skip_invalid, args.correlation_id))
        except (PublishFailed, OSError) as exc:
            print(f"python -m workers publish: {exc}", file=sys.stderr)
            return 1

    if args.command == "rebuild":
        from workers.rebuild import rebuild

        result = asyncio.run(rebuild(settings.database_url, swap=not args.check))
        print(
            f"{'checked' if args.check else 'rebuilt'} {result['rows']} images; "
            f"{result['differences']} rows differed from the live table"
        )
        return 0

    if args.command == "dead-letters":
        from workers import deadletters

        if args.action == "list":
            action = deadletters.list_dead_letters
        else:
            action = deadletters.replay_dead_letters
        count = asyncio.run(action(settings, limit=args.limit, reason=args.reason, message_ids=args.message_ids))
        print(f"{count} dead letters {'listed' if args.action == 'list' else 'replayed'}", file=sys.stderr)
        return 0

    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass
    return asyncio.run(_run(settings))


if __name__ == "__main__":
    sys.exit(main())
