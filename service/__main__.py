"""Command line of the API: `python -m service [serve|migrate|accounts ...]`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from service import logs, settings as settings_module


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="CloudAPI GetImage over a Postgres read model.",
        epilog="Settings come from environment variables:\n" + settings_module.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the HTTP API (the default)")
    commands.add_parser("migrate", help="apply pending database migrations, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_module.Settings.from_env()
    except settings_module.SettingsError as exc:
        print(f"python -m service: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)

    if args.command == "migrate":
        from service.migrate import migrate

        try:
            asyncio.run(migrate(settings.database_url))
        except (OSError, Exception) as exc:  # noqa: BLE001 (reported, then a non-zero exit)
            print(f"python -m service migrate: failed: {exc}", file=sys.stderr)
            return 1
        return 0

    from service.app import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
