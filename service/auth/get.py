"""`python -m service get URL --account LOGIN --key FILE`: one signed CloudAPI request.

A small client for trying the service and for scripts: it signs the request the way
the `triton` CLI does (Date and request target, key named by its MD5 fingerprint) and
prints the body, or the status line and headers too with `-i`.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization

from service.auth.client import load_private_key, sign_headers
from service.auth.keys import parse_public_key


def key_id_for(login: str, private_key) -> str:
    public = private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"/{login}/keys/{parse_public_key(public.decode()).md5_fingerprint}"


def run(url: str, *, account: str, key_path: str, method: str = "GET", headers: list[str] = (), include: bool = False) -> int:
    """Send the request and print the response; return 0 for a 2xx status, 1 otherwise."""
    private_key = load_private_key(key_path)
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request_headers = {"Accept": "application/json"}
    for header in headers:
        name, _, value = header.partition(":")
        request_headers[name.strip()] = value.strip()
    request_headers.update(sign_headers(private_key, key_id=key_id_for(account, private_key), method=method, target=target))
    request = urllib.request.Request(url, method=method, headers=request_headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, reason, response_headers, body = response.status, response.reason, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, reason, response_headers, body = error.code, error.reason, error.headers, error.read()
    if include:
        print(f"HTTP/1.1 {status} {reason}")
        for name, value in response_headers.items():
            print(f"{name}: {value}")
        print()
    sys.stdout.write(body.decode("utf-8", "replace"))
    if body:
        sys.stdout.write("\n")
    return 0 if 200 <= status < 300 else 1
