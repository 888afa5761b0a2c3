"""The signature checking thread of service.auth.verifier, the choice between it and the
helper process, and the signature forms they check."""

import asyncio

import pytest

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from service.auth.keys import parse_public_key
from service.auth import verifier as verifier_module
from service.auth.helper import HelperVerifier
from service.auth.verifier import ThreadVerifier, start_verifier

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def _public(private_key):
    text = private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return parse_public_key(text.decode())


def _cases():
    rsa_public, ed_public = _public(RSA_KEY), _public(ED_KEY)
    cases = []
    for index in range(200):
        data = f"date: request {index}".encode()
        if index % 2:
            signature = RSA_KEY.sign(data, padding.PKCS1v15(), hashes.SHA256())
            key, algorithm = rsa_public, "rsa-sha256"
        else:
            signature = ED_KEY.sign(data)
            key, algorithm = ed_public, "ed25519-sha512"
        valid = index % 3 != 0
        cases.append((key, algorithm, signature, data if valid else data + b"!", valid))
    return cases


async def test_many_checks_at_once_each_get_their_result():
    verifier = ThreadVerifier()
    cases = _cases()
    try:
        futures = [verifier.verify(key, algorithm, signature, data) for key, algorithm, signature, data, _ in cases]
        results = await asyncio.wait_for(asyncio.gather(*futures), timeout=20)
    finally:
        await verifier.close()

    assert results == [valid for *_, valid in cases]


async def test_checks_after_close_run_in_place():
    verifier = ThreadVerifier()
    await verifier.close()
    await asyncio.wait_for(asyncio.to_thread(verifier._thread.join), timeout=20)
    key, algorithm, signature, data, valid = _cases()[1]

    assert not verifier._thread.is_alive()
    assert await asyncio.wait_for(verifier.verify(key, algorithm, signature, data), timeout=20) is valid


@pytest.mark.parametrize(
    ("cpus", "api_processes", "expected"),
    [(2.0, 1, HelperVerifier), (2.0, 2, ThreadVerifier), (1.5, 1, ThreadVerifier), (8.0, 4, HelperVerifier)],
)
async def test_auto_needs_a_spare_cpu(monkeypatch, cpus, api_processes, expected):
    monkeypatch.setattr(verifier_module, "usable_cpus", lambda: cpus)

    verifier = await start_verifier("auto", api_processes)
    await verifier.close()

    assert type(verifier) is expected


@pytest.mark.parametrize(("mode", "expected"), [("helper", HelperVerifier), ("thread", ThreadVerifier)])
async def test_named_mode_ignores_cpus(monkeypatch, mode, expected):
    monkeypatch.setattr(verifier_module, "usable_cpus", lambda: 1.0 if mode == "helper" else 64.0)

    verifier = await start_verifier(mode, 1)
    await verifier.close()

    assert type(verifier) is expected


def test_usable_cpus_is_at_most_the_affinity():
    import os

    cpus = verifier_module.usable_cpus()

    assert 0 < cpus <= len(os.sched_getaffinity(0))


def test_raw_ecdsa_signature_starting_like_der():
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    private_key = ec.generate_private_key(ec.SECP256R1())
    public_key = _public(private_key)
    # Sign until r starts with 0x30, DER's first byte (about one signature in 256).
    for attempt in range(5000):
        data = f"date: attempt {attempt}".encode()
        r, s = decode_dss_signature(private_key.sign(data, ec.ECDSA(hashes.SHA256())))
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if raw[0] == 0x30:
            break

    assert raw[0] == 0x30
    assert public_key.verify("ecdsa-sha256", raw, data)


async def test_failed_helper_falls_back_to_thread(monkeypatch):
    from service.auth import helper as helper_module

    async def fail_to_spawn(self):
        raise OSError("no such interpreter")

    monkeypatch.setattr(helper_module.HelperVerifier, "_spawn", fail_to_spawn)

    verifier = await start_verifier("helper", 1)
    await verifier.close()

    assert type(verifier) is ThreadVerifier
