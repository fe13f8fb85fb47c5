"""The nixl transport: the local transport's slots and headers, with the bytes moved by NIXL one-sided writes.

For a replica and a shard on different hosts (it works on one too). Each side allocates its own
``SLOTS`` slots (request region, response region; the local transport's layout) and registers
them with its NIXL agent; the hello over a TCP control connection exchanges the agents' metadata
and the slots' addresses. Per batch::

    replica  tensors copied into its slot -> NIXL WRITE of the request bytes into the shard's slot
             -> (transfer done) header over TCP
    shard    header -> serve(batch) from its slot -> output in its response region -> NIXL WRITE into
             the replica's response region -> (done) response header over TCP
    replica  header -> output read from its own response region

NIXL picks the wire (UCX: shared memory or TCP on CPU machines, RDMA/NVLink where the hardware has
it). Headers are length-prefixed on the TCP stream. The NIXL package (``nixl-cu12``) is optional:
``available()`` says whether it imports; without it ``--transport auto`` never picks nixl.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import logging
import select
import socket
import struct
import threading
import time
import uuid

import torch

from epserve.services.cluster.expert_channel import ExpertShardError
from epserve.services.cluster.local_transport import SLOTS, LocalChannel, LocalExpertServer


_LENGTH = struct.Struct("<I")


def available() -> bool:
    """Whether NIXL is installed (found, not loaded: its libraries load with the first agent)."""
    return importlib.util.find_spec("nixl_cu12") is not None


def _new_agent():
    """A NIXL agent with no progress thread. Imported here, not at the top: NIXL's bundled libraries
    (abseil, protobuf) are loaded only into processes that use it."""
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    logging.getLogger("nixl").setLevel(logging.WARNING)                  # not a line per agent made
    return nixl_agent(f"epserve-{uuid.uuid4().hex}", nixl_agent_config(enable_prog_thread=False))


class _Agent:
    """A NIXL agent writing from its slots to a peer's, without a progress thread.

    NIXL's own progress thread polls without pause (two idle agents took both cores here), and over
    TCP the target of a write must progress too. So each side progresses its agent itself: while a
    write of its own is in flight, and every ``POLL_S`` while it waits for the other side's header.
    """

    POLL_S = 0.0005

    def __init__(self, buffers: list[torch.Tensor]):
        self.agent = _new_agent()
        self.buffers, self._lock, self._peers = buffers, threading.Lock(), []
        self._registered = self.agent.register_memory(buffers)

    def metadata(self) -> dict:
        return {"agent": base64.b64encode(self.agent.get_agent_metadata()).decode(),
                "addresses": [b.data_ptr() for b in self.buffers]}

    def add_peer(self, hello: dict) -> tuple[str, list[int]]:
        name = self.agent.add_remote_agent(base64.b64decode(hello["agent"]))
        self._peers.append(name)
        return name, hello["addresses"]

    def close(self) -> None:
        """Forget the peers and unregister the slots (the agent and its UCX worker go with the object)."""
        with self._lock:
            for name in self._peers:
                self.agent.remove_remote_agent(name)
            self.agent.deregister_memory(self._registered)
            self._peers.clear()

    def write(self, peer: tuple[str, list[int]], slot: int, offset: int, nbytes: int) -> None:
        """Copy ``[offset, offset + nbytes)`` of our ``slot`` into the same place of the peer's; returns when done."""
        name, addresses = peer
        with self._lock:
            local = self.agent.get_xfer_descs([(self.buffers[slot].data_ptr() + offset, nbytes, 0)], "DRAM")
            remote = self.agent.get_xfer_descs([(addresses[slot] + offset, nbytes, 0)], "DRAM")
            handle = self.agent.initialize_xfer("WRITE", local, remote, name)
            try:
                state = self.agent.transfer(handle)
                while state not in ("DONE", "ERR"):
                    time.sleep(self.POLL_S / 10)
                    state = self.agent.check_xfer_state(handle)      # progresses the transfer
            finally:
                self.agent.release_xfer_handle(handle)
        if state == "ERR":
            raise OSError(f"NIXL write of {nbytes} bytes to {name} failed")


    def wait_readable(self, sock: socket.socket) -> None:
        """Progress the agent (a peer's write into our slots lands) until ``sock`` has data or closes."""
        while not select.select([sock], [], [], self.POLL_S)[0]:
            with self._lock:
                self.agent.get_new_notifs()                          # one round of backend progress


def _send_framed(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _receive_framed(sock: socket.socket) -> bytes:
    """One length-prefixed message; b"" when the peer closed the connection."""
    head = _receive_exactly(sock, _LENGTH.size)
    return _receive_exactly(sock, _LENGTH.unpack(head)[0]) if head else b""


def _receive_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def _tcp(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class NixlChannel(LocalChannel):
    """The replica's end over NIXL: its own registered slots, writes into the shard's."""

    KIND = "nixl"

    def _connect(self, address: str) -> socket.socket:
        try:
            return _tcp(address)
        except OSError as e:
            raise ExpertShardError(self.shard, self.address, f"cannot connect: {e}") from None

    def _setup(self, slot_bytes: int) -> list[torch.Tensor]:
        buffers = [torch.zeros(2 * slot_bytes, dtype=torch.uint8) for _ in range(SLOTS)]
        self._agent = _Agent(buffers)
        _send_framed(self._socket, json.dumps({"slot_bytes": slot_bytes, **self._agent.metadata()}).encode())
        reply = _receive_framed(self._socket)
        if not reply:
            raise ExpertShardError(self.shard, self.address, "the shard closed the connection during the hello")
        self._peer = self._agent.add_peer(json.loads(reply))
        return buffers

    def _push(self, slot: int, nbytes: int) -> None:
        self._agent.write(self._peer, slot, 0, nbytes)

    def _send_message(self, data: bytes) -> None:
        _send_framed(self._socket, data)

    def _receive_message(self) -> bytes:
        self._agent.wait_readable(self._socket)
        return _receive_framed(self._socket)

    def close(self, timeout_s: float) -> None:
        super().close(timeout_s)
        if getattr(self, "_agent", None) is not None:
            self._agent.close()


class NixlExpertServer(LocalExpertServer):
    """The shard's end over NIXL: a TCP control port; ``name`` is ``host:port`` to advertise."""

    def __init__(self, serve, label: str, host: str = "127.0.0.1", advertise_host: str | None = None):
        self._host, self._advertise = host, advertise_host or host
        self._agents: dict[socket.socket, _Agent] = {}          # per connection
        super().__init__(serve, label)

    def _listen(self) -> tuple[socket.socket, str]:
        sock = socket.create_server((self._host, 0))
        return sock, f"{self._advertise}:{sock.getsockname()[1]}"

    def _handshake(self, connection: socket.socket):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = json.loads(_receive_framed(connection))
        slot_bytes = hello["slot_bytes"]
        buffers = [torch.zeros(2 * slot_bytes, dtype=torch.uint8) for _ in range(SLOTS)]
        agent = _Agent(buffers)
        peer = agent.add_peer(hello)
        _send_framed(connection, json.dumps(agent.metadata()).encode())
        self._agents[connection] = agent
        return buffers, slot_bytes, (agent, peer)

    def _push_output(self, peer, slot: int, slot_bytes: int, nbytes: int) -> None:
        agent, remote = peer
        agent.write(remote, slot, slot_bytes, nbytes)

    def _send_message(self, connection: socket.socket, data: bytes) -> None:
        _send_framed(connection, data)

    def _receive_message(self, connection: socket.socket) -> bytes:
        self._agents[connection].wait_readable(connection)
        return _receive_framed(connection)

    def _connection_closed(self, connection: socket.socket) -> None:
        agent = self._agents.pop(connection, None)
        if agent is not None:
            agent.close()

