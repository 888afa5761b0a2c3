"""The bench database: migrations, ten accounts with RSA-2048 keys, and 100,000 images.

The images are the 309 real manifests of tests/data/real-manifests.jsonl plus generated
copies of them with new UUIDs, names and a mix of visibility:

| share | owner                     | public | state                          | acl                 |
|-------|---------------------------|--------|--------------------------------|---------------------|
| 55 %  | the operator              | true   | active                         | none                |
| 2 %   | the operator              | true   | disabled                       | none                |
| 20 %  | a bench account           | false  | active                         | none                |
| 3 %   | a bench account           | false  | unactivated, creating, failed  | none                |
| 15 %  | an account outside bench  | false  | active                         | 1 to 3 bench accounts |
| 5 %   | an account outside bench  | false  | active                         | none (seen by no bench account) |

They are written with the worker's own projector (`workers.projector.apply_batch`) in
batches of 1,000, after `workers.contract.decode` checked each event, so the rows are
exactly what the worker would store. The set is built from a fixed seed, and a row in
`bench_dataset` records that it is complete, so later sessions reuse it.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
import uuid
from dataclasses import dataclass

import asyncpg
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench import config
from bench.processes import BenchError
from service import accounts
from service.auth.keys import parse_public_key
from workers.contract import OPERATOR_UUID, decode
from workers.producer import image_event
from workers.projector import apply_batch

# Bump when the generated set changes, so an old bench database is reloaded.
DATASET_VERSION = "v1"
_SEED = 20261204
_BATCH = 1000
_OTHER_OWNERS = [str(uuid.uuid5(config.NAMESPACE, f"other-owner-{i}")) for i in range(100)]
_FAILED_ERROR = {"code": "PrepareImageDidNotRun", "message": "prepare-image script did not indicate it was run"}


@dataclass(frozen=True)
class Account:
    index: int
    login: str
    uuid: str
    private_key: object
    key_id: str  # /LOGIN/keys/<MD5 fingerprint>, as the triton CLI names it

    @property
    def key_path(self) -> str:
        return str(config.STATE_DIR / "keys" / f"{self.login}.pem")


def _load_or_create_key(login: str):
    path = config.STATE_DIR / "keys" / f"{login}.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(pem)
    return key


def _openssh_public(private_key) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def bench_accounts() -> list[Account]:
    """Return the bench accounts with their private keys (created on first use)."""
    found = []
    for index in range(config.ACCOUNT_COUNT):
        login = config.account_login(index)
        key = _load_or_create_key(login)
        fingerprint = parse_public_key(_openssh_public(key)).md5_fingerprint
        found.append(Account(index, login, config.account_uuid(index), key, f"/{login}/keys/{fingerprint}"))
    return found


def migrate() -> None:
    """Create (if needed) and migrate the bench database with `python -m service migrate`."""
    env = {**os.environ, "DATABASE_URL": config.database_url(), "LOG_LEVEL": "warning"}
    result = subprocess.run([config.PYTHON, "-m", "service", "migrate"], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"python -m service migrate failed for {config.database_url()}:\n{result.stderr}")


async def _register_accounts(connection: asyncpg.Connection, bench: list[Account]) -> None:
    for account in bench:
        rows = await connection.fetch("SELECT login FROM accounts WHERE uuid = $1", account.uuid)
        if not rows:
            await accounts.add_account(connection, account.login, account.uuid)
        registered = await connection.fetch(
            "SELECT md5_fingerprint FROM account_keys WHERE account_uuid = $1 AND NOT removed", account.uuid)
        fingerprint = account.key_id.rsplit("/", 1)[1]
        if fingerprint not in {row["md5_fingerprint"] for row in registered}:
            await accounts.add_key(connection, account.login, _openssh_public(account.private_key))


def _real_manifests() -> list[dict]:
    with open(config.REAL_MANIFESTS, "rb") as handle:
        return [orjson.loads(line) for line in handle if line.strip()]


def generated_manifests() -> list[dict]:
    """Return the 100,000 manifests of the data set, the real ones first."""
    rng = random.Random(_SEED)
    real = _real_manifests()
    manifests = list(real)
    bench_uuids = [config.account_uuid(i) for i in range(config.ACCOUNT_COUNT)]
    for index in range(len(real), config.IMAGE_COUNT):
        template = real[index % len(real)]
        manifest = orjson.loads(orjson.dumps(template))
        manifest["uuid"] = config.image_uuid(index)
        manifest["name"] = f"{template.get('name', 'image')}-b{index}"
        draw = rng.random()
        manifest["disabled"] = False
        manifest.pop("acl", None)
        manifest.pop("error", None)
        if draw < 0.55:
            manifest.update(owner=OPERATOR_UUID, public=True, state="active")
        elif draw < 0.57:
            manifest.update(owner=OPERATOR_UUID, public=True, state="disabled", disabled=True)
        elif draw < 0.77:
            manifest.update(owner=rng.choice(bench_uuids), public=False, state="active")
        elif draw < 0.80:
            state = rng.choice(("unactivated", "creating", "failed"))
            manifest.update(owner=rng.choice(bench_uuids), public=False, state=state)
            manifest.pop("published_at", None)
            if state == "failed":
                manifest["error"] = dict(_FAILED_ERROR)
        elif draw < 0.95:
            manifest.update(owner=rng.choice(_OTHER_OWNERS), public=False, state="active",
                            acl=rng.sample(bench_uuids, rng.randint(1, 3)))
        else:
            manifest.update(owner=rng.choice(_OTHER_OWNERS), public=False, state="active")
        manifests.append(manifest)
    return manifests


async def _load_images(connection: asyncpg.Connection, manifests: list[dict]) -> None:
    for start in range(0, len(manifests), _BATCH):
        events = [decode(orjson.dumps(image_event("image.updated", manifest, revision=1)))
                  for manifest in manifests[start:start + _BATCH]]
        await apply_batch(connection, events)


async def _prepare(reset: bool) -> list[Account]:
    bench = bench_accounts()
    connection = await asyncpg.connect(config.database_url())
    try:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS bench_dataset (version text PRIMARY KEY, images integer NOT NULL, "
            "loaded_at timestamptz NOT NULL)")
        loaded = await connection.fetchval("SELECT images FROM bench_dataset WHERE version = $1", DATASET_VERSION)
        if reset or loaded != config.IMAGE_COUNT:
            started = time.monotonic()
            print(f"loading {config.IMAGE_COUNT:,} images into {config.DATABASE_NAME} ...", flush=True)
            await connection.execute("TRUNCATE images, event_log, bench_dataset")
            await _load_images(connection, generated_manifests())
            await connection.execute("TRUNCATE event_log")
            await connection.execute("INSERT INTO bench_dataset VALUES ($1, $2, now())", DATASET_VERSION,
                                     config.IMAGE_COUNT)
            print(f"loaded in {time.monotonic() - started:.1f} s", flush=True)
        await _register_accounts(connection, bench)
    finally:
        await connection.close()
    return bench


def prepare(reset: bool = False) -> list[Account]:
    """Migrate the bench database, load the images unless they are there, register the accounts."""
    migrate()
    return asyncio.run(_prepare(reset))


@dataclass
class Visibility:
    """Per bench account, the images it may read, split by the rule that lets it read them."""

    public: list[str]  # public and active or disabled: visible to every account
    owned: dict[int, list[str]]  # by account index: its own images, in every state
    shared: dict[int, list[str]]  # by account index: private images whose acl lists it


async def _visibility() -> Visibility:
    index_of = {config.account_uuid(i): i for i in range(config.ACCOUNT_COUNT)}
    connection = await asyncpg.connect(config.database_url())
    try:
        rows = await connection.fetch(
            "SELECT uuid::text AS uuid, owner, public, state, acl FROM images WHERE NOT deleted ORDER BY uuid")
    finally:
        await connection.close()
    result = Visibility(public=[], owned={i: [] for i in index_of.values()}, shared={i: [] for i in index_of.values()})
    for row in rows:
        activated = row["state"] in ("active", "disabled")
        if row["owner"] in index_of:
            result.owned[index_of[row["owner"]]].append(row["uuid"])
        elif activated and row["public"]:
            result.public.append(row["uuid"])
        elif activated:
            for member in row["acl"] or ():
                if member in index_of:
                    result.shared[index_of[member]].append(row["uuid"])
    return result


def visibility() -> Visibility:
    """Read, from the database, which images each bench account can see, and why."""
    return asyncio.run(_visibility())


async def vacuum() -> None:
    """VACUUM ANALYZE the read model, so every run starts without dead rows from the last."""
    connection = await asyncpg.connect(config.database_url())
    try:
        await connection.execute("VACUUM (ANALYZE) images")
        await connection.execute("VACUUM (ANALYZE) event_log")
    finally:
        await connection.close()


async def truncate_event_log() -> None:
    """Empty event_log: the worker and freshness parts add up to 300,000 rows a run to it."""
    connection = await asyncpg.connect(config.database_url())
    try:
        await connection.execute("TRUNCATE event_log")
    finally:
        await connection.close()
