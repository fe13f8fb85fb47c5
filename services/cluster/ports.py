"""Free ports for a server that is started later (an embedded Redis, a router whose port must survive restarts).

A port found by binding port 0 and closing the socket is one the kernel hands out again: any socket bound to port
0 meanwhile (another service's server, an outgoing connection) may get it, and the server then fails to bind. So a
port is chosen outside the kernel's ephemeral range (``ip_local_port_range``), where no such socket is put, and
checked free by binding it.
"""
from __future__ import annotations

import logging
import random
import socket
from pathlib import Path

log = logging.getLogger(__name__)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 20000                 # below: well-known and registered services' ports
ATTEMPTS = 200


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` now, outside the ephemeral range (inside it only if none is free)."""
    low, high = _ephemeral_range()
    outside = [*range(LOWEST, low), *range(high + 1, 65536)]
    if not outside:
        log.warning("the ephemeral port range %d-%d leaves no port outside it from %d: ports are taken from inside "
                    "it, where another socket may be given them first", low, high, LOWEST)
    ports: list[int] = []
    for port in random.sample(outside, min(ATTEMPTS, len(outside))):
        if len(ports) == count:
            break
        if _bindable(host, port):
            ports.append(port)
    return ports + [_any_port(host) for _ in range(count - len(ports))]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(n) for n in EPHEMERAL_RANGE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999                          # Linux's default


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _any_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
