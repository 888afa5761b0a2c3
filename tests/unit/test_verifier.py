"""The signature verifier thread of service.auth.verifier, and the signature forms it checks."""

import asyncio

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from service.auth.keys import parse_public_key
from service.auth.verifier import SignatureVerifier

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
    verifier = SignatureVerifier()
    cases = _cases()
    try:
        futures = [verifier.verify(key, algorithm, signature, data) for key, algorithm, signature, data, _ in cases]
        results = await asyncio.wait_for(asyncio.gather(*futures), timeout=20)
    finally:
        verifier.close()

    assert results == [valid for *_, valid in cases]


async def test_checks_after_close_run_in_place():
    verifier = SignatureVerifier()
    verifier.close()
    await asyncio.wait_for(asyncio.to_thread(verifier._thread.join), timeout=20)
    key, algorithm, signature, data, valid = _cases()[1]

    assert not verifier._thread.is_alive()
    assert await asyncio.wait_for(verifier.verify(key, algorithm, signature, data), timeout=20) is valid


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
