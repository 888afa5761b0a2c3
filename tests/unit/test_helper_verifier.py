"""The signature helper process of service.auth.helper: replies, failures and its lifetime."""

import asyncio
import contextlib
import marshal
import os
import signal
import sys

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from service.auth import helper as helper_module
from service.auth.keys import parse_public_key
from service.auth.checker import LENGTH, REPLY_CHUNK, serve
from service.auth.helper import SEND_CHUNK, HelperVerifier

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _public(private_key):
    text = private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return parse_public_key(text.decode())


def _cases(count=200):
    rsa_public, ed_public, ec_public = _public(RSA_KEY), _public(ED_KEY), _public(EC_KEY)
    cases = []
    for index in range(count):
        data = f"date: request {index}".encode()
        if index % 3 == 0:
            signature = RSA_KEY.sign(data, padding.PKCS1v15(), hashes.SHA256())
            key, algorithm = rsa_public, "rsa-sha256"
        elif index % 3 == 1:
            signature = ED_KEY.sign(data)
            key, algorithm = ed_public, "ed25519-sha512"
        else:
            signature = EC_KEY.sign(data, ec.ECDSA(hashes.SHA256()))
            key, algorithm = ec_public, "ecdsa-sha256"
        valid = index % 4 != 0
        cases.append((key, algorithm, signature, data if valid else data + b"!", valid))
    return cases


async def _verify_all(verifier, cases):
    futures = [verifier.verify(key, algorithm, signature, data) for key, algorithm, signature, data, _ in cases]
    return await asyncio.wait_for(asyncio.gather(*futures), timeout=20)


async def _wait_for(condition, timeout=20):
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
async def verifier():
    started = await HelperVerifier.start()
    yield started
    await started.close()


async def test_helper_batch_results_match(verifier):
    cases = _cases()

    results = await _verify_all(verifier, cases)

    assert results == [valid for *_, valid in cases]
    assert verifier.checked_in_place == 0


class _RecordingTransport:
    """A transport in place of the helper's socket, which decodes and keeps each message written."""

    def __init__(self):
        self.messages = []

    def write(self, data):
        (size,) = LENGTH.unpack_from(data)
        assert len(data) == LENGTH.size + size
        self.messages.append(marshal.loads(data[LENGTH.size :]))


async def test_helper_requests_go_in_chunks():
    # Full messages go at once, so the helper starts before the pass ends. The rest
    # go at the end of the pass.
    verifier = HelperVerifier(asyncio.get_running_loop())
    transport = _RecordingTransport()
    verifier.connection_made(transport)
    cases = _cases(2 * SEND_CHUNK + 5)

    futures = [verifier.verify(key, algorithm, signature, data) for key, algorithm, signature, data, _ in cases]
    sent_during_pass = [len(message) for message in transport.messages]
    await asyncio.sleep(0)

    assert sent_during_pass == [SEND_CHUNK, SEND_CHUNK]
    assert [len(message) for message in transport.messages] == [SEND_CHUNK, SEND_CHUNK, 5]
    numbers = [request[0] for message in transport.messages for request in message]
    assert numbers == list(range(len(cases)))
    # Two reply messages, the second split over two reads, resolve every future.
    first = marshal.dumps([(number, True) for number in numbers[:10]])
    second = marshal.dumps([(number, False) for number in numbers[10:]])
    stream = LENGTH.pack(len(first)) + first + LENGTH.pack(len(second)) + second
    verifier.data_received(stream[:-7])
    verifier.data_received(stream[-7:])
    assert [future.result() for future in futures] == [True] * 10 + [False] * (len(cases) - 10)
    verifier._disconnect()


def test_checker_replies_in_chunks():
    cases = _cases(2 * REPLY_CHUNK + 3)
    requests = [
        (number, key.openssh, algorithm, signature, data)
        for number, (key, algorithm, signature, data, _) in enumerate(cases)
    ]
    payload = marshal.dumps(requests)
    to_helper_read, to_helper_write = os.pipe()
    from_helper_read, from_helper_write = os.pipe()
    os.write(to_helper_write, LENGTH.pack(len(payload)) + payload)
    os.close(to_helper_write)  # the helper returns once its input ends

    # serve() ignores SIGINT and SIGTERM, as the helper must, so restore this process's handlers.
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve(to_helper_read, from_helper_write)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    os.close(to_helper_read)
    os.close(from_helper_write)
    with os.fdopen(from_helper_read, "rb") as replies_file:
        stream = replies_file.read()

    messages = []
    while stream:
        (size,) = LENGTH.unpack_from(stream)
        messages.append(marshal.loads(stream[LENGTH.size : LENGTH.size + size]))
        stream = stream[LENGTH.size + size :]
    assert [len(message) for message in messages] == [REPLY_CHUNK, REPLY_CHUNK, 3]
    replies = [reply for message in messages for reply in message]
    assert replies == [(number, valid) for number, (*_, valid) in enumerate(cases)]


async def test_helper_checks_one_at_a_time(verifier):
    cases = _cases(30)

    results = [await asyncio.wait_for(verifier.verify(*case[:4]), timeout=20) for case in cases]

    assert results == [valid for *_, valid in cases]
    assert verifier.checked_in_place == 0


async def test_helper_wrong_algorithm_is_false(verifier):
    key, _, signature, data, _ = _cases(1)[0]

    assert await asyncio.wait_for(verifier.verify(key, "ed25519-sha512", signature, data), timeout=20) is False
    assert await asyncio.wait_for(verifier.verify(key, "rsa-md5", signature, data), timeout=20) is False


async def test_helper_close_checks_in_place():
    verifier = await HelperVerifier.start()
    process = verifier._process
    await verifier.close()
    key, algorithm, signature, data, valid = _cases(2)[1]

    assert process.returncode == 0
    assert verifier.helper_pid is None
    assert await asyncio.wait_for(verifier.verify(key, algorithm, signature, data), timeout=20) is valid
    assert verifier.checked_in_place == 1


async def test_helper_killed_loses_no_check(verifier, monkeypatch):
    monkeypatch.setattr(helper_module, "_RESTART_DELAYS", (0.05,))
    cases = _cases(60)
    first_pid = verifier.helper_pid
    futures = [verifier.verify(key, algorithm, signature, data) for key, algorithm, signature, data, _ in cases]
    # Let the batch go out, then kill the helper before (or while) it replies.
    await asyncio.sleep(0)
    os.kill(first_pid, signal.SIGKILL)

    results = await asyncio.wait_for(asyncio.gather(*futures), timeout=20)
    await _wait_for(lambda: verifier.helper_pid not in (None, first_pid))
    checked_before = verifier.checked_in_place
    after = await _verify_all(verifier, cases)

    assert results == [valid for *_, valid in cases]
    assert after == [valid for *_, valid in cases]
    assert verifier.checked_in_place == checked_before


async def test_helper_ignores_group_sigterm(verifier):
    # `timeout` and systemd signal every process of the group. The API process stops
    # its helper itself, once its requests are done.
    cases = _cases(6)
    await _verify_all(verifier, cases)  # the helper has started serving
    pid = verifier.helper_pid
    os.kill(pid, signal.SIGTERM)

    results = await _verify_all(verifier, cases)

    assert results == [valid for *_, valid in cases]
    assert verifier.helper_pid == pid
    assert verifier.checked_in_place == 0


async def test_helper_unreadable_key_checked_in_place(verifier):
    key, algorithm, signature, data, valid = _cases(2)[1]
    # A key whose OpenSSH text does not parse: the helper replies None, the loop checks.
    unreadable = type(key)(
        key_type=key.key_type,
        openssh="ssh-ed25519 not-base64",
        md5_fingerprint=key.md5_fingerprint,
        sha256_fingerprint=key.sha256_fingerprint,
        comment="",
        key=key.key,
    )

    assert await asyncio.wait_for(verifier.verify(unreadable, algorithm, signature, data), timeout=20) is valid
    assert verifier.checked_in_place == 1


_OWNER = """
import asyncio, sys
from service.auth.checker import LENGTH, REPLY_CHUNK, serve
from service.auth.helper import SEND_CHUNK, HelperVerifier

async def main():
    verifier = await HelperVerifier.start()
    print(verifier.helper_pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def test_helper_exits_with_killed_api():
    owner = await asyncio.create_subprocess_exec(sys.executable, "-c", _OWNER, stdout=asyncio.subprocess.PIPE)
    try:
        helper_pid = int(await asyncio.wait_for(owner.stdout.readline(), timeout=20))
        assert not _gone(helper_pid)
    finally:
        owner.kill()
        await owner.wait()

    await _wait_for(lambda: _gone(helper_pid))
    assert _gone(helper_pid)


async def test_helper_stalled_is_replaced(verifier, monkeypatch):
    # A helper that stops replying (here SIGSTOP) must not hold requests: after the
    # reply timeout the loop checks them itself and starts a new helper.
    monkeypatch.setattr(helper_module, "_REPLY_TIMEOUT", 0.2)
    monkeypatch.setattr(helper_module, "_RESTART_DELAYS", (0.05,))
    cases = _cases(12)
    await _verify_all(verifier, cases)
    stalled_pid = verifier.helper_pid
    os.kill(stalled_pid, signal.SIGSTOP)
    try:
        results = await _verify_all(verifier, cases)
        await _wait_for(lambda: verifier.helper_pid not in (None, stalled_pid))
    finally:
        # The verifier has killed it. If it has not, SIGCONT lets it run on and exit.
        with contextlib.suppress(ProcessLookupError):
            os.kill(stalled_pid, signal.SIGCONT)
    checked_before = verifier.checked_in_place
    after = await _verify_all(verifier, cases)

    assert results == [valid for *_, valid in cases]
    assert checked_before == len(cases)
    assert after == [valid for *_, valid in cases]
    assert verifier.checked_in_place == checked_before
    assert _gone(stalled_pid)


async def test_helper_busy_is_kept(verifier, monkeypatch):
    # Replies that keep coming, each batch well inside the timeout, are progress.
    monkeypatch.setattr(helper_module, "_REPLY_TIMEOUT", 0.3)
    pid = verifier.helper_pid
    cases = _cases(9)
    async with asyncio.timeout(20):
        for _ in range(10):
            await _verify_all(verifier, cases)
            await asyncio.sleep(0.1)

    assert verifier.helper_pid == pid
    assert verifier.checked_in_place == 0
