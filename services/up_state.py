"""What ``epserve up`` runs, where: its services' kind, id, pid, address and restarts, as a JSON file.

    {"endpoint": "127.0.0.1:50051", "http_endpoint": "http://127.0.0.1:8000/v1", "redis_url": "redis://admin:PASSWORD@127.0.0.1:PORT/0", "cluster": "up-1a2b3c4d",
     "pid": PID of epserve up, "ready": true once the endpoint answers its health check,
     "services": [{"kind": "redis", "id": "0", "pid": ..., "address": "127.0.0.1:PORT", "restarts": 0},
                  {"kind": "expert", "id": "0", "pid": ..., "address": "127.0.0.1:PORT", "restarts": 0},
                  ..., {"kind": "router", "id": "router-0", ...}]}

``address`` is what the service registered in Redis under its own pid (null between a restart and
the new process's registration). The file is replaced atomically whenever something in it changes;
it is mode 0600: ``redis_url`` holds the password of Redis's admin user; ``admin_tls`` names the CA,
certificate and key files of the admin identity, which may call attention replicas and expert shards
(``cluster_tls``; the files live in a private directory of ``epserve up`` while it runs).
``read_up_state`` and ``wait_ready`` are the reader's side (the harness's fault injection, tests, benchmarks).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from epserve.services.cluster.keys import Keys
from epserve.services.cluster.private_file import write_private
from epserve.services.cluster.redis_server import EmbeddedRedis
from epserve.services.cluster.registry import Registry


@dataclass
class UpService:
    kind: str                        # "expert" | "attention" | "router"
    service_id: str                  # its id in the registry
    process: subprocess.Popen
    restarts: int = 0
    address: str | None = None       # registered by this process (None until it has)


class UpState:
    """The services of one ``epserve up``, kept in step with the registry and written to ``path``."""

    def __init__(self, redis_server: EmbeddedRedis, cluster: str, endpoint: str, path: str | None,
                 http_endpoint: str | None = None, admin_tls: tuple[str, str, str] | None = None):
        self.redis_server, self.cluster, self.endpoint, self.path = redis_server, cluster, endpoint, path
        self.http_endpoint = http_endpoint            # the OpenAI API's base URL
        self.admin_tls = admin_tls                    # (CA, cert, key) files of the admin identity
        self.registry = Registry(redis.Redis.from_url(redis_server.url), Keys(cluster))
        self.services: list[UpService] = []
        self.ready = False

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    def add(self, kind: str, service_id: str, process: subprocess.Popen) -> None:
        self.services.append(UpService(kind, service_id, process))
        self._write()

    def restarted(self, service: UpService, process: subprocess.Popen) -> None:
        service.process, service.restarts, service.address = process, service.restarts + 1, None
        self._write()

    def registered(self, kind: str) -> bool:
        """Whether every ``kind`` service has registered its current process (reads Redis when not yet)."""
        self.refresh()
        return all(s.address is not None for s in self.services if s.kind == kind)

    def refresh(self) -> None:
        """Take the address of each service whose current process has registered since the last look."""
        waiting = {s.kind for s in self.services if s.address is None}
        if not waiting:
            return
        changed = False
        for kind in waiting:
            entries = {(e.service_id, e.pid): e.address for e in self.registry.live(kind)}
            for s in self.services:
                if s.kind == kind and s.address is None:
                    s.address = entries.get((s.service_id, s.process.pid))
                    changed |= s.address is not None
        if changed:
            self._write()

    def changed(self) -> None:
        """Write the file again (Redis was restarted: a new pid)."""
        self._write()

    def set_ready(self) -> None:
        self.ready = True
        self._write()

    def remove(self) -> None:
        if self.path:
            Path(self.path).unlink(missing_ok=True)

    def _write(self) -> None:
        if not self.path:
            return
        redis_entry = {"kind": "redis", "id": "0", "pid": self.redis_server.pid,
                       "address": f"127.0.0.1:{self.redis_server.port}", "restarts": self.redis_server.restarts}
        state = {"endpoint": self.endpoint, "http_endpoint": self.http_endpoint, "redis_url": self.redis_url,
                 "cluster": self.cluster, "pid": os.getpid(), "ready": self.ready,
                 "admin_tls": dict(zip(("ca", "cert", "key"), self.admin_tls)) if self.admin_tls else None,
                 "services": [redis_entry] + [{"kind": s.kind, "id": s.service_id, "pid": s.process.pid,
                                               "address": s.address, "restarts": s.restarts} for s in self.services]}
        write_private(self.path, json.dumps(state, indent=1))          # whole, 0600, by a rename


def read_up_state(path: str | Path) -> dict:
    """The state file of a running ``epserve up`` (see the module docstring for its fields)."""
    return json.loads(Path(path).read_text())


def wait_ready(path: str | Path, process: subprocess.Popen, timeout_s: float) -> dict:
    """The state of the ``epserve up`` ``process`` once it says ready; RuntimeError if it exits first,
    TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"epserve up exited with status {process.returncode} before it was ready")
        try:
            state = read_up_state(path)
            if state["ready"]:
                return state
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"epserve up not ready after {timeout_s} s (state file {path})")


def find_service(state: dict, kind: str, service_id: str) -> dict:
    """The entry of service ``kind``/``service_id`` in a state file; LookupError naming what exists."""
    for entry in state["services"]:
        if entry["kind"] == kind and entry["id"] == service_id:
            return entry
    known = ", ".join(f"{e['kind']} {e['id']}" for e in state["services"])
    raise LookupError(f"no {kind} service {service_id!r} in the state file (it has: {known})")
