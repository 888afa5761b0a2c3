"""The real `triton` and `sdc-getimage` command-line clients against the service.

Each client runs with a throwaway HOME holding freshly generated SSH keys (and, for the
agent cases, an ssh-agent of the test's own), points at the API on loopback, and must
print the image and exit 0, or print its not-found message and exit non-zero for an
image the account cannot see. Needs Node.js and `npm ci` in tests/clients (tests/run
does it).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from service import accounts as account_commands
from service.auth.keys import parse_public_key
from tests.helpers import PUB, PUB_UUID, manifest, new_uuid

pytestmark = pytest.mark.clients

CLIENTS = Path(__file__).parent / "node_modules"
TRITON = CLIENTS / "triton" / "bin" / "triton"
SDC_GETIMAGE = CLIENTS / "smartdc" / "bin" / "sdc-getimage"
LOGIN = "cli-user"
HIDDEN = manifest(owner=new_uuid(), public=False, name="someone-elses")
RUN_TIMEOUT = 60  # seconds a client run may take (they retry refused connections for 15 s)


def _node_path() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (tests/run and .ci/run install it)")
    if not TRITON.exists() or not SDC_GETIMAGE.exists():
        pytest.fail("the clients are not installed: run `npm ci` in tests/clients (tests/run does it)")
    return str(Path(node).parent)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A temporary HOME with ~/.ssh holding one key of each type the clients support."""
    home = tmp_path_factory.mktemp("client-home")
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700)
    for name, options in (
        ("id_rsa", ["-t", "rsa", "-b", "2048"]),
        ("id_ecdsa", ["-t", "ecdsa", "-b", "256"]),
        ("id_ecdsa521", ["-t", "ecdsa", "-b", "521"]),
        ("id_ed25519", ["-t", "ed25519"]),
    ):
        subprocess.run(["ssh-keygen", "-q", *options, "-N", "", "-C", name, "-f", str(ssh / name)], check=True)
    return home


def _fingerprint(home: Path, name: str) -> str:
    return parse_public_key((home / ".ssh" / f"{name}.pub").read_text()).md5_fingerprint


@pytest.fixture(scope="module", autouse=True)
async def _account_and_images(home, db_pool):
    from tests.conftest import store_manifests

    await store_manifests(db_pool, PUB, HIDDEN)
    async with db_pool.acquire() as connection:
        await account_commands.add_account(connection, LOGIN)
        for name in ("id_rsa", "id_ecdsa", "id_ecdsa521", "id_ed25519"):
            await account_commands.add_key(connection, LOGIN, (home / ".ssh" / f"{name}.pub").read_text(), name)


async def _run(command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"{command[0]} did not finish within {RUN_TIMEOUT}s") from None
    return process.returncode, stdout.decode(), stderr.decode()


def _env(home: Path, **variables: str) -> dict[str, str]:
    # Built from scratch, so no SSH_AUTH_SOCK, TRITON_* or SDC_* of the outer shell leaks in.
    return {"PATH": f"{_node_path()}:/usr/bin:/bin", "HOME": str(home), **variables}


async def triton(api: str, home: Path, key: str, image: str, **extra: str):
    env = _env(home, TRITON_URL=api, TRITON_ACCOUNT=LOGIN, TRITON_KEY_ID=_fingerprint(home, key), **extra)
    return await _run([str(TRITON), "image", "get", image], env)


async def sdc_getimage(api: str, home: Path, key: str, image: str, **extra: str):
    env = _env(home, SDC_URL=api, SDC_ACCOUNT=LOGIN, SDC_KEY_ID=_fingerprint(home, key), **extra)
    return await _run([str(SDC_GETIMAGE), image], env)


@pytest.mark.parametrize("key", ["id_rsa", "id_ecdsa", "id_ecdsa521", "id_ed25519"])
async def test_triton_image_get(api, home, key):
    status, stdout, stderr = await triton(api, home, key, PUB_UUID)

    assert status == 0, stderr
    image = json.loads(stdout)
    assert image["id"] == PUB_UUID
    assert image["name"] == "base"
    assert image["type"] == "zone-dataset"


@pytest.mark.parametrize("key", ["id_rsa", "id_ecdsa", "id_ecdsa521"])
async def test_sdc_getimage(api, home, key):
    status, stdout, stderr = await sdc_getimage(api, home, key, PUB_UUID)

    assert status == 0, stderr
    image = json.loads(stdout)
    assert image["id"] == PUB_UUID
    assert image["version"] == "13.4.0"


async def test_triton_hidden_image(api, home):
    status, stdout, stderr = await triton(api, home, "id_ed25519", HIDDEN["uuid"])

    assert status != 0
    assert "ResourceNotFound" in stderr
    assert f"image with id {HIDDEN['uuid']} was not found" in stderr
    assert stdout == ""


async def test_sdc_getimage_hidden_image(api, home):
    status, stdout, stderr = await sdc_getimage(api, home, "id_rsa", HIDDEN["uuid"])

    assert status != 0
    assert f"image {HIDDEN['uuid']} not found" in stderr
    assert stdout == ""


async def test_triton_unknown_key(api, home, tmp_path):
    other = tmp_path / "other"
    (other / ".ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other / ".ssh" / "id_ed25519")], check=True)

    status, _, stderr = await triton(api, other, "id_ed25519", PUB_UUID)

    assert status != 0
    assert "InvalidCredentials" in stderr


@pytest.fixture
def agent(home, tmp_path):
    """An ssh-agent of this test holding every key of `home`; killed by its pid afterwards."""
    socket_path = tmp_path / "agent.sock"
    output = subprocess.run(["ssh-agent", "-s", "-a", str(socket_path)], check=True, capture_output=True, text=True).stdout
    pid = int(output.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SSH_AUTH_SOCK": str(socket_path)}
        for name in ("id_rsa", "id_ecdsa", "id_ed25519"):
            subprocess.run(["ssh-add", "-q", str(home / ".ssh" / name)], check=True, env=env, capture_output=True)
        yield str(socket_path)
    finally:
        os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize("key", ["id_rsa", "id_ed25519"])
async def test_sdc_getimage_with_agent(api, home, agent, key):
    # From an agent, sdc-getimage signs RSA keys with rsa-sha1, and it can use Ed25519
    # keys only this way.
    status, stdout, stderr = await sdc_getimage(api, home, key, PUB_UUID, SSH_AUTH_SOCK=agent)

    assert status == 0, stderr
    assert json.loads(stdout)["id"] == PUB_UUID


async def test_triton_with_agent(api, home, agent):
    status, stdout, stderr = await triton(api, home, "id_rsa", PUB_UUID, SSH_AUTH_SOCK=agent)

    assert status == 0, stderr
    assert json.loads(stdout)["id"] == PUB_UUID
