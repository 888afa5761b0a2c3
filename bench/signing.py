"""Pre-generate signed GetImage requests for wrk, with no signature used twice.

A request is one line of tab-separated fields: method, path, then `Name: value` headers.
bench/requests.lua reads the file and sends the lines in order. The signature covers
`date` and `(request-target)` (as the triton CLI signs), and RSA PKCS#1 v1.5 signatures
are deterministic, so a signature is unique when its (account, path, Date) triple is.
The generator draws triples without repeats and checks the signatures' digests too.

Dates are spread over the 60 seconds around the generation time, so every request stays
within the server's 300-second clock skew window for `valid_until - time.time()` seconds.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import time
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from bench import config
from bench.dataset import Account, Visibility
from service.auth.client import sign_headers

MAX_CLOCK_SKEW = 300  # seconds; the service's window (service.auth.signature.MAX_CLOCK_SKEW)
DATE_SPREAD = 30  # seconds either side of the generation time
_CHUNK = 2000
_STATIC_HEADERS = "Accept: application/json\tAccept-Version: ~9||~8\tUser-Agent: cloudapi-images-bench"

# Share of requests per visibility rule; the rest of the data set is read through them.
CATEGORY_WEIGHTS = (("public", 0.60), ("owned", 0.25), ("shared", 0.15))


@dataclass(frozen=True)
class RequestFile:
    path: Path
    count: int
    valid_until: float  # time.time() after which the oldest Date is past the skew window
    seconds: float  # time the generation took
    expected_errors: int = 0  # requests that should get 404 (coverage files only)

    def remaining(self) -> float:
        return self.valid_until - time.time()


_KEYS: dict[int, tuple[object, str, str]] = {}


def _init_signer(accounts: list[tuple[int, str, str, str]]) -> None:
    for index, key_path, key_id, login in accounts:
        with open(key_path, "rb") as handle:
            _KEYS[index] = (serialization.load_pem_private_key(handle.read(), password=None), key_id, login)


def _sign_chunk(chunk: list[tuple[int, str, str]]) -> tuple[bytes, list[bytes]]:
    lines = []
    digests = []
    for account_index, image, date in chunk:
        key, key_id, login = _KEYS[account_index]
        path = f"/{login}/images/{image}"
        headers = sign_headers(key, key_id=key_id, method="GET", target=path, date=date)
        authorization = headers["Authorization"]
        digests.append(hashlib.blake2b(authorization.encode(), digest_size=12).digest())
        lines.append(f"GET\t{path}\t{_STATIC_HEADERS}\tDate: {date}\tAuthorization: {authorization}\n")
    return "".join(lines).encode("ascii"), digests


def _write(triples: list[tuple[int, str, str]], accounts: list[Account], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = [triples[i:i + _CHUNK] for i in range(0, len(triples), _CHUNK)]
    signers = [(a.index, a.key_path, a.key_id, a.login) for a in accounts]
    seen: set[bytes] = set()
    context = multiprocessing.get_context("fork")
    with context.Pool(os.cpu_count() or 1, initializer=_init_signer, initargs=(signers,)) as pool, \
            open(path, "wb") as out:
        for data, digests in pool.imap(_sign_chunk, chunks):
            out.write(data)
            seen.update(digests)
    return len(seen)


def _dates(now: float) -> list[str]:
    return [formatdate(now + offset, usegmt=True) for offset in range(-DATE_SPREAD, DATE_SPREAD + 1)]


def generate(accounts: list[Account], visible: Visibility, count: int, name: str, seed: int) -> RequestFile:
    """Write `count` distinct signed requests, chosen at random among visible images."""
    started = time.time()
    rng = random.Random(seed)
    dates = _dates(started)
    categories = [c for c, _ in CATEGORY_WEIGHTS]
    weights = [w for _, w in CATEGORY_WEIGHTS]
    chosen: set[tuple[int, str, str]] = set()
    triples = []
    for i in range(count):
        account = i % len(accounts)
        while True:
            category = rng.choices(categories, weights)[0]
            pool = visible.public if category == "public" else getattr(visible, category)[account]
            triple = (account, rng.choice(pool), rng.choice(dates))
            if triple not in chosen:
                break
        chosen.add(triple)
        triples.append(triple)
    path = config.STATE_DIR / "requests" / f"{name}.tsv"
    distinct = _write(triples, accounts, path)
    if distinct != count:
        raise RuntimeError(f"{count - distinct} of {count} signatures in {path} are repeated")
    return RequestFile(path, count, started - DATE_SPREAD + MAX_CLOCK_SKEW, time.time() - started)


def generate_coverage(accounts: list[Account], visible: Visibility, image_uuids: list[str], name: str,
                      seed: int) -> RequestFile:
    """Write one request per image of `image_uuids`, in random order, each signed by an
    account that can see it. The first account requests the images that no bench account
    can see; they get 404 responses but still pass through the cache."""
    started = time.time()
    rng = random.Random(seed)
    dates = _dates(started)
    reader: dict[str, int] = {}
    for index in range(len(accounts)):
        for image in visible.owned[index] + visible.shared[index]:
            reader[image] = index
    public = set(visible.public)
    order = list(image_uuids)
    rng.shuffle(order)
    triples = []
    hidden = 0
    for image in order:
        if image in public:
            account = rng.randrange(len(accounts))
        elif image in reader:
            account = reader[image]
        else:
            account = 0
            hidden += 1
        triples.append((account, image, rng.choice(dates)))
    path = config.STATE_DIR / "requests" / f"{name}.tsv"
    _write(triples, accounts, path)
    return RequestFile(path, len(triples), started - DATE_SPREAD + MAX_CLOCK_SKEW, time.time() - started,
                       expected_errors=hidden)
