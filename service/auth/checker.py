"""The signature helper process: `python -m service.auth.checker`.

`service.auth.helper.HelperVerifier` starts it with a socket as its standard input and
output. It imports no more than the key module needs, to stay small (about 25 MB
resident, most of it `cryptography`), and exits when its input ends.

A message is a 4-byte big-endian length and a marshal-encoded list. Requests are
(number, OpenSSH key text, algorithm, signature, signing string); replies are
(number, True | False | None), None meaning the helper could not check it. The helper
replies to a request message in order, in messages of up to `REPLY_CHUNK` replies.
"""

from __future__ import annotations

import marshal
import os
import signal
import struct

from service.auth.keys import InvalidKey, PublicKey, parse_public_key

LENGTH = struct.Struct("!I")
_MAX_MESSAGE = 64 * 1024 * 1024
_KEPT_KEYS = 4096  # parsed keys kept. When full, the helper clears them.
# Maximum replies in one message. The API process writes the responses of each reply
# message while the helper checks the rest (see `service.auth.helper.SEND_CHUNK`).
REPLY_CHUNK = 8


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _check(keys: dict[str, PublicKey], openssh: str, algorithm: str, signature: bytes, data: bytes) -> bool | None:
    key = keys.get(openssh)
    if key is None:
        try:
            key = parse_public_key(openssh)
        except InvalidKey:
            return None
        if len(keys) >= _KEPT_KEYS:
            keys.clear()
        keys[openssh] = key
    return key.verify(algorithm, signature, data)


def serve(reader: int = 0, writer: int = 1) -> None:
    """Run the helper: reply to every message on `reader` until it ends."""
    # Ctrl-C in a terminal, `timeout` and systemd signal the whole process group (or
    # cgroup) at once. The API process decides when its helper stops, by closing the
    # socket once the requests in flight are done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keys: dict[str, PublicKey] = {}
    while True:
        head = _read_exactly(reader, LENGTH.size)
        if head is None:
            return
        (size,) = LENGTH.unpack(head)
        if size > _MAX_MESSAGE:
            return
        payload = _read_exactly(reader, size)
        if payload is None:
            return
        replies = []
        for number, openssh, algorithm, signature, data in marshal.loads(payload):
            try:
                outcome = _check(keys, openssh, algorithm, signature, data)
            except Exception:
                outcome = None
            replies.append((number, outcome))
            if len(replies) == REPLY_CHUNK:
                _reply(writer, replies)
                replies = []
        if replies:
            _reply(writer, replies)


def _reply(writer: int, replies: list) -> None:
    message = marshal.dumps(replies)
    _write_all(writer, LENGTH.pack(len(message)) + message)


if __name__ == "__main__":
    serve()
