"""The authentication stage of the request pipeline: establish who is calling.

It only sets `request[CALLER]`; every failure is raised as a CloudAPI error and answered
by the pipeline. An unknown login, an unknown key and a wrong signature get the same
401, after the same amount of work (a signature check against a stand-in key), so the
answer does not tell which logins or keys exist. A disabled account is reported only
after its signature verified, for the same reason.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import NamedTuple

import structlog
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from service.auth.keys import PublicKey, parse_public_key
from service.auth.signature import Credentials, RequestView, parse_authorization
from service.auth.store import Account, KeyStore
from service.auth.verifier import Verifier
from service.errors import InvalidCredentials, NotAuthorized
from service.http import CALLER

log = structlog.get_logger("auth")

KEY_STORE = web.AppKey("key_store", KeyStore)
VERIFIER = web.AppKey("signature_verifier", Verifier)


class Caller(NamedTuple):
    """The authenticated account of a request."""

    uuid: str
    login: str
    key_id: str


def parse_key_id(key_id: str) -> tuple[str, str]:
    """Split `/LOGIN/keys/KEY` into (LOGIN, KEY); LOGIN may be the account UUID."""
    parts = key_id.split("/")
    if len(parts) == 4 and parts[0] == "" and parts[2] == "keys" and parts[1] and parts[3]:
        return parts[1], parts[3]
    # A SHA256 fingerprint is base64, which may itself contain "/".
    if len(parts) > 4 and parts[0] == "" and parts[1] and parts[2] == "keys" and parts[3].startswith("SHA256:"):
        return parts[1], "/".join(parts[3:])
    if len(parts) == 6 and parts[0] == "" and parts[4] == "keys":
        raise InvalidCredentials(
            f"Invalid KeyId {key_id} in authorization header: sub-user keys are not supported, sign with an account key"
        )
    raise InvalidCredentials(f"Invalid KeyId {key_id} in authorization header")


def _stand_in_keys() -> dict[str, PublicKey]:
    """Keys of each type that verify nothing: checked when the real key is unknown."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    ed_key = ed25519.Ed25519PrivateKey.generate().public_key()
    keys = {}
    for family, key in (("rsa", rsa_key), ("ecdsa", ec_key), ("ed25519", ed_key)):
        text = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        keys[family] = parse_public_key(text)
    return keys


_STAND_INS: dict[str, PublicKey] | None = None


def prepare() -> None:
    """Generate the stand-in keys now rather than on the first unknown key."""
    global _STAND_INS
    if _STAND_INS is None:
        _STAND_INS = _stand_in_keys()


def _stand_in(algorithm: str) -> PublicKey:
    prepare()
    return _STAND_INS.get(algorithm.partition("-")[0], _STAND_INS["rsa"])


def _decode_signature(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def request_view(request: web.BaseRequest) -> RequestView:
    version = request.version
    return RequestView(
        method=request.method,
        target=request.raw_path,
        http_version=f"{version.major}.{version.minor}",
        headers=request.headers,
    )


async def authenticate(request: web.Request) -> None:
    """Verify the request's HTTP Signature and set `request[CALLER]`, or raise."""
    credentials = parse_authorization(request.headers.get("Authorization"), request_view(request), time.time())
    account_reference, key_reference = parse_key_id(credentials.key_id)
    account = await request.app[KEY_STORE].find(account_reference)
    request[CALLER] = await verify(credentials, account, key_reference, request.app.get(VERIFIER))


async def verify(
    credentials: Credentials, account: Account | None, key_reference: str, verifier: Verifier | None
) -> Caller:
    """Check `credentials` against the key `key_reference` of `account` and return the
    caller, or raise InvalidCredentials or NotAuthorized.

    `account` is None when no such account exists. The check runs on `verifier` (a
    thread or a helper process) when there is one, else on the event loop.
    """
    key = account.find_key(key_reference) if account is not None else None
    signature = _decode_signature(credentials.signature)

    # Without a key or a readable signature, a stand-in key checks the request anyway,
    # so the response takes as long as for a wrong signature.
    genuine = key is not None and signature is not None
    checked_key = key if genuine else _stand_in(credentials.algorithm)
    checked_signature = signature if genuine else signature or b"\0" * 64
    if verifier is not None:
        verified = await verifier.verify(checked_key, credentials.algorithm, checked_signature, credentials.signing_string)
    else:
        verified = checked_key.verify(credentials.algorithm, checked_signature, credentials.signing_string)
    verified = verified and genuine

    if not verified:
        if account is None:
            reason = "unknown_account"
        elif key is None:
            reason = "unknown_key"
        else:
            reason = "bad_signature"
        log.warning(
            "auth_rejected",
            reason=reason,
            key_id=credentials.key_id[:200],
            algorithm=credentials.algorithm,
        )
        raise InvalidCredentials()
    if account.disabled:
        log.warning("auth_rejected", reason="account_disabled", login=account.login)
        raise NotAuthorized("Account or user is disabled")
    return Caller(uuid=account.uuid, login=account.login, key_id=credentials.key_id)
