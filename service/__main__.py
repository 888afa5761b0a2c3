"""Command line of the API: `python -m service [serve|migrate|accounts ...]`."""

from __future__ import annotations

import argparse
import asyncio
import sys

# structlog imports rich when it is installed (the test tools bring it), and would then
# render tracebacks with rich, which shows local variables. The commands never use rich,
# so its import fails here, before structlog's; that also saves about 4 MB per process.
sys.modules.setdefault("rich", None)

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

    get = commands.add_parser("get", help="send one signed request and print the answer")
    get.add_argument("url", help="e.g. http://127.0.0.1:8080/my/images/<uuid>")
    get.add_argument("--account", required=True, help="login to sign as")
    get.add_argument("--key", required=True, help="unencrypted private key file (OpenSSH or PEM)")
    get.add_argument("--method", default="GET", choices=["GET", "HEAD"])
    get.add_argument("-H", "--header", action="append", default=[], help="extra header 'Name: value'")
    get.add_argument("-i", "--include", action="store_true", help="print the status line and headers")

    accounts = commands.add_parser("accounts", help="manage accounts and their SSH keys")
    actions = accounts.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create an account (or rename the account --uuid)")
    add.add_argument("login")
    add.add_argument("--uuid", help="account UUID (default: a new random one)")
    add_key = actions.add_parser("add-key", help="register an OpenSSH public key (RSA, ECDSA or Ed25519)")
    add_key.add_argument("login", help="login or account UUID")
    add_key.add_argument("key", help="a .pub file, or the key text itself ('ssh-ed25519 AAAA...')")
    add_key.add_argument("--name", help="key name (default: its MD5 fingerprint)")
    remove_key = actions.add_parser("remove-key", help="remove a key by name or fingerprint")
    remove_key.add_argument("login", help="login or account UUID")
    remove_key.add_argument("key", help="key name, MD5 fingerprint or SHA256 fingerprint")
    actions.add_parser("list", help="list accounts")
    keys = actions.add_parser("keys", help="list an account's keys")
    keys.add_argument("login", help="login or account UUID")
    for name, text in (
        ("disable", "disable an account: its requests get 403"),
        ("enable", "enable a disabled account"),
        ("remove", "remove all keys of an account and disable it"),
    ):
        actions.add_parser(name, help=text).add_argument("login", help="login or account UUID")
    return parser


def _key_text(argument: str) -> str:
    """Return the key text of `argument`, reading it from a file when it names one."""
    if argument.lstrip().startswith(("ssh-", "ecdsa-")):
        return argument
    with open(argument, encoding="utf-8") as handle:
        return handle.read()


async def _accounts(settings, args) -> int:
    import asyncpg

    from service import accounts

    connection = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
    try:
        if args.action == "add":
            account_uuid = await accounts.add_account(connection, args.login, args.uuid)
            print(f"{args.login} {account_uuid}")
        elif args.action == "add-key":
            key = await accounts.add_key(connection, args.login, _key_text(args.key), args.name)
            if args.name:
                print(f"added {key.key_type} key {args.name} ({key.md5_fingerprint}, {key.sha256_fingerprint})")
            else:
                # Unnamed keys are named by their MD5 fingerprint.
                print(f"added {key.key_type} key {key.md5_fingerprint} ({key.sha256_fingerprint})")
        elif args.action == "remove-key":
            name = await accounts.remove_key(connection, args.login, args.key)
            print(f"removed key {name}")
        elif args.action == "list":
            for row in await accounts.list_accounts(connection):
                state = "disabled" if row["disabled"] else "enabled"
                print(f"{row['login']}\t{row['uuid']}\t{state}\t{row['keys']} keys")
        elif args.action == "keys":
            for row in await accounts.list_keys(connection, args.login):
                print(f"{row['name']}\t{row['key_type']}\t{row['md5_fingerprint']}\t{row['sha256_fingerprint']}")
        elif args.action in ("disable", "enable"):
            await accounts.set_disabled(connection, args.login, args.action == "disable")
            print(f"{args.action}d {args.login}")
        elif args.action == "remove":
            await accounts.remove_account(connection, args.login)
            print(f"removed the keys of {args.login} and disabled it")
    finally:
        await connection.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "get":
        from service.auth import get

        try:
            return get.run(
                args.url, account=args.account, key_path=args.key, method=args.method, headers=args.header, include=args.include
            )
        except (OSError, ValueError) as exc:
            print(f"python -m service get: {exc}", file=sys.stderr)
            return 1
    try:
        settings = settings_module.Settings.from_env()
    except settings_module.SettingsError as exc:
        print(f"python -m service: {exc}", file=sys.stderr)
        return 2
    # The server logs a line per request, so it writes its log in batches.
    logs.configure(settings.log_format, settings.log_level, buffered=args.command in (None, "serve"))

    if args.command == "migrate":
        from service.migrate import migrate

        try:
            asyncio.run(migrate(settings.database_url))
        except (OSError, Exception) as exc:  # noqa: BLE001 (reported, then a non-zero exit)
            print(f"python -m service migrate: failed: {exc}", file=sys.stderr)
            return 1
        return 0

    if args.command == "accounts":
        import asyncpg

        from service.accounts import AccountError

        try:
            return asyncio.run(_accounts(settings, args))
        except (AccountError, OSError) as exc:
            print(f"python -m service accounts {args.action}: {exc}", file=sys.stderr)
            return 1
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError) as exc:
            print(f"python -m service accounts {args.action}: failed: the database lacks a migration of this "
                  f"release ({exc}); run `python -m service migrate` first", file=sys.stderr)
            return 1

    from service.app import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
