"""Ports chosen for servers started later lie outside the kernel's ephemeral range, where a socket bound to port 0
(another service's server, an outgoing connection) is never put, and are free."""
import socket

import pytest

from epserve.services.cluster import ports

pytestmark = pytest.mark.unit


def test_the_ports_are_distinct_free_and_outside_the_ephemeral_range():
    low, high = ports._ephemeral_range()
    if low - ports.LOWEST + 65535 - high < 100:
        pytest.skip(f"this machine's ephemeral range {low}-{high} leaves few ports outside it")
    chosen = ports.free_ports(8)
    assert len(set(chosen)) == 8
    assert all(ports.LOWEST <= port < low or high < port <= 65535 for port in chosen)
    for port in chosen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))                 # free: binding it works


def test_a_port_in_use_is_not_chosen(monkeypatch):
    (port,) = ports.free_ports(1)
    if not ports._bindable("127.0.0.1", port + 1):
        pytest.skip(f"port {port + 1} is in use")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        monkeypatch.setattr(ports, "LOWEST", port)                      # two candidates: the first is taken
        monkeypatch.setattr(ports, "_ephemeral_range", lambda: (port + 2, 65535))
        assert ports.free_ports(1) == [port + 1]
