"""OpenSSH public keys: parsing, fingerprints, and signature verification per algorithm."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

# Key types accepted for registration, by their OpenSSH name.
_KEY_TYPES = {
    "ssh-rsa": "rsa",
    "ecdsa-sha2-nistp256": "ecdsa",
    "ecdsa-sha2-nistp384": "ecdsa",
    "ecdsa-sha2-nistp521": "ecdsa",
    "ssh-ed25519": "ed25519",
}
MAX_KEY_TEXT = 16384  # characters of an OpenSSH public key line

# Signing algorithms of the Authorization header, and the hash each one uses.
_HASHES = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
_PKCS1 = padding.PKCS1v15()
SUPPORTED_ALGORITHMS = frozenset(
    {
        "rsa-sha1",
        "rsa-sha256",
        "rsa-sha512",
        "ecdsa-sha256",
        "ecdsa-sha384",
        "ecdsa-sha512",
        "ed25519-sha512",
    }
)


class InvalidKey(ValueError):
    """The text is not an OpenSSH public key of a supported type."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A parsed public key with the forms a `keyId` may name it by."""

    key_type: str  # rsa, ecdsa or ed25519
    openssh: str  # "<type> <base64>" without the comment
    md5_fingerprint: str  # colon-separated lower-case hex, as CloudAPI stores it
    sha256_fingerprint: str  # "SHA256:<base64 without padding>", as ssh-keygen prints it
    comment: str
    key: object  # the cryptography public key object

    def verify(self, algorithm: str, signature: bytes, data: bytes) -> bool:
        """Return True when `signature` over `data` is valid for `algorithm` and this key."""
        family, _, hash_name = algorithm.partition("-")
        if family != self.key_type:
            return False
        try:
            if family == "rsa":
                self.key.verify(signature, data, _PKCS1, _HASHES[hash_name])
            elif family == "ecdsa":
                self.key.verify(_der_ecdsa_signature(self.key, signature), data, ec.ECDSA(_HASHES[hash_name]))
            elif family == "ed25519":
                self.key.verify(signature, data)
            else:
                return False
        except (InvalidSignature, ValueError, KeyError, UnsupportedAlgorithm):
            return False
        return True


def _der_ecdsa_signature(key: ec.EllipticCurvePublicKey, signature: bytes) -> bytes:
    """Return `signature` as DER; a raw r||s pair of the curve's size is converted."""
    size = (key.curve.key_size + 7) // 8
    if len(signature) != 2 * size:
        return signature
    # A raw pair starts with 0x30, DER's first byte, once in 256 signatures: only a
    # well-formed DER sequence counts as DER.
    try:
        decode_dss_signature(signature)
    except ValueError:
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        return encode_dss_signature(r, s)
    return signature


def parse_public_key(text: str) -> PublicKey:
    """Parse one OpenSSH public key line (`ssh-ed25519 AAAA... comment`)."""
    if len(text) > MAX_KEY_TEXT:
        raise InvalidKey(f"key text is longer than {MAX_KEY_TEXT} characters")
    if text.lstrip().startswith("-----BEGIN"):
        # `ssh-keygen` writes the private key to the file without `.pub`, next to the public one.
        raise InvalidKey("expected an OpenSSH public key line, not a PEM block such as a private key: use the .pub file")
    parts = text.strip().split(None, 2)
    if len(parts) < 2:
        raise InvalidKey("expected an OpenSSH public key: '<type> <base64> [comment]'")
    openssh_type, encoded = parts[0], parts[1]
    comment = parts[2].strip() if len(parts) > 2 else ""
    key_type = _KEY_TYPES.get(openssh_type)
    if key_type is None:
        supported = ", ".join(sorted(_KEY_TYPES))
        raise InvalidKey(f"key type {openssh_type!r} is not supported; use one of {supported}")
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey("the key's base64 part is not valid base64") from None
    try:
        key = serialization.load_ssh_public_key(f"{openssh_type} {encoded}".encode("ascii"))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidKey(f"not a valid {openssh_type} key: {exc}") from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise InvalidKey(f"key type {openssh_type!r} is not supported")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 1024:
        raise InvalidKey(f"RSA keys must have at least 1024 bits, this one has {key.key_size}")
    md5 = hashlib.md5(blob).hexdigest()
    sha256 = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return PublicKey(
        key_type=key_type,
        openssh=f"{openssh_type} {encoded}",
        md5_fingerprint=":".join(md5[i : i + 2] for i in range(0, 32, 2)),
        sha256_fingerprint=f"SHA256:{sha256}",
        comment=comment,
        key=key,
    )
