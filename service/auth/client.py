"""Sign requests the way CloudAPI clients do: for tests, benchmarks and the demo command.

    headers = sign_headers(private_key, key_id="/demo/keys/id_rsa", method="GET",
                           target="/my/images/<uuid>")

The result holds `Date` and `Authorization` (current format, signing `date` and
`(request-target)` as the `triton` CLI does); `legacy=True` gives the older format that
signs the Date value alone.
"""

from __future__ import annotations

import base64
from email.utils import formatdate

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def load_private_key(path: str):
    """Load an unencrypted private key file (OpenSSH or PEM format)."""
    with open(path, "rb") as handle:
        data = handle.read()
    if b"OPENSSH PRIVATE KEY" in data:
        return serialization.load_ssh_private_key(data, password=None)
    return serialization.load_pem_private_key(data, password=None)


def default_algorithm(private_key) -> str:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return "rsa-sha256"
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return {256: "ecdsa-sha256", 384: "ecdsa-sha384", 521: "ecdsa-sha512"}[private_key.curve.key_size]
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "ed25519-sha512"
    raise ValueError(f"unsupported key type {type(private_key).__name__}")


def sign(private_key, algorithm: str, data: bytes) -> bytes:
    """Return the raw signature of `data` (DER for ECDSA, as the clients send it)."""
    hash_name = algorithm.partition("-")[2]
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(data, padding.PKCS1v15(), _HASHES[hash_name]())
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(data, ec.ECDSA(_HASHES[hash_name]()))
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(data)
    raise ValueError(f"unsupported key type {type(private_key).__name__}")


def sign_headers(
    private_key,
    *,
    key_id: str,
    method: str = "GET",
    target: str = "/",
    algorithm: str | None = None,
    date: str | None = None,
    signed: tuple[str, ...] = ("date", "(request-target)"),
    legacy: bool = False,
    extra_headers: dict[str, str] | None = None,
) -> dict[str, str]:
    """Return the `Date` and `Authorization` headers of a signed request."""
    algorithm = algorithm or default_algorithm(private_key)
    date = date or formatdate(usegmt=True)
    values = {"date": date, **{name.lower(): value for name, value in (extra_headers or {}).items()}}
    if legacy:
        lines = [values[name] for name in signed]
    else:
        lines = []
        for name in signed:
            if name == "(request-target)":
                lines.append(f"(request-target): {method.lower()} {target}")
            else:
                lines.append(f"{name}: {values[name]}")
    signature = base64.b64encode(sign(private_key, algorithm, "\n".join(lines).encode("utf-8"))).decode("ascii")
    if legacy:
        params = f'keyId="{key_id}",algorithm="{algorithm}"'
        if signed != ("date",):
            params += f',headers="{" ".join(signed)}"'
        authorization = f"Signature {params} {signature}"
    else:
        authorization = (
            f'Signature keyId="{key_id}",algorithm="{algorithm}",headers="{" ".join(signed)}",signature="{signature}"'
        )
    return {"Date": date, "Authorization": authorization}
