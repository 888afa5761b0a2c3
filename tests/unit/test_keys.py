"""Parsing of the public keys that operators pass to `python -m service accounts add-key`."""

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from service.auth.keys import InvalidKey, parse_public_key


def _private_and_public() -> tuple[str, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private, public


def test_public_key_line_is_parsed():
    _, public = _private_and_public()

    key = parse_public_key(public + " laptop\n")

    assert key.key_type == "ed25519"
    assert key.md5_fingerprint.count(":") == 15


@pytest.mark.parametrize("form", ["openssh", "pkcs8"])
def test_private_key_rejected_with_hint(form):
    private, _ = _private_and_public()
    if form == "pkcs8":
        private = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    with pytest.raises(InvalidKey, match=r"OpenSSH public key line, not a PEM block.*use the \.pub file"):
        parse_public_key(private)
