"""The local transport's trust boundary: an abstract Unix socket has no file mode, so an expert shard's
local server admits only peers running as its own user (SO_PEERCRED) and closes other connections."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from epserve.services.cluster.local_transport import LocalExpertServer

pytestmark = pytest.mark.unit
NOBODY = 65534
PYTHON = shutil.which("python3", path="/usr/bin:/bin")      # one any user may run (not the venv's)
# connects, then waits up to 2 s for the server: "closed" if it hung up, "open" if it kept the connection
PEER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect("\\0" + sys.argv[1])
s.settimeout(2)
try:
    print("closed" if s.recv(16) == b"" else "data")
except socket.timeout:
    print("open")
except ConnectionResetError:
    print("closed")
"""


def _peer(name: str, user: int | None) -> str:
    result = subprocess.run([PYTHON, "-c", PEER, name], user=user, cwd="/", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(os.getuid() != 0 or PYTHON is None, reason="a peer as another user needs root and a system python3")
def test_a_peer_of_another_user_is_closed_and_one_of_the_same_user_is_kept():
    server = LocalExpertServer(lambda batch: None, "expert shard 0")
    try:
        assert _peer(server.name, NOBODY) == "closed"
        assert _peer(server.name, None) == "open"
    finally:
        server.close()


def test_a_shard_that_cannot_use_gpu_slots_says_why_and_keeps_serving():
    """A replica's GPU hello (CUDA IPC handles) to a shard that cannot open them gets a refusal with the reason
    (the replica then falls back to host-memory slots), and the server goes on taking connections."""
    import json
    import socket

    from epserve.services.cluster.cuda_ipc import REFUSED

    server = LocalExpertServer(lambda batch: None, "expert shard 0")
    try:
        for _ in range(2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.connect("\0" + server.name)
            sock.settimeout(30)
            sock.send(json.dumps({"slot_bytes": 4096, "cuda": {"gpu": "GPU-0", "memory": [], "nbytes": 0,
                                                                "requests": [], "responses": []}}).encode())
            reply = sock.recv(4096)
            assert reply[:1] == REFUSED and reply[1:], reply
            assert sock.recv(16) == b""                              # and the connection is closed
            sock.close()
    finally:
        server.close()
