"""A throwaway redis-server of our own on a loopback port, no persistence.

Tests stop it mid-test and bring it back (`restart()` keeps the port) to exercise the
distributed rate limiter's fallback when Redis goes away.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self
from urllib.parse import urlsplit

from sqlproxy.embedded._process import EmbeddedServerError, Watchdog, free_port

__all__ = ["EmbeddedRedis", "ExternalRedis", "RedisServer", "find_redis_server"]

_SEARCH_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/opt/homebrew/bin")


def find_redis_server() -> Path:
    """$SQLPROXY_REDIS_SERVER, then PATH, then the usual install directories."""
    explicit = os.environ.get("SQLPROXY_REDIS_SERVER")
    if explicit:
        return Path(explicit)
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    for d in _SEARCH_DIRS:
        p = Path(d) / "redis-server"
        if os.access(p, os.X_OK):
            return p
    raise EmbeddedServerError(
        "redis-server not found on PATH or in /usr/bin, /usr/local/bin; "
        "install it (`apt-get install redis-server`) or set SQLPROXY_TEST_REDIS_URL"
    )


class RedisServer(Protocol):
    @property
    def url(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def managed(self) -> bool:
        """True when we started it and may stop/restart it."""
        ...


class ExternalRedis:
    """A running Redis given by URL (e.g. $SQLPROXY_TEST_REDIS_URL); never stopped."""

    def __init__(self, url: str) -> None:
        self._url = url
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379

    @property
    def url(self) -> str:
        return self._url

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def managed(self) -> bool:
        return False


_running: set[EmbeddedRedis] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _running_lock:
        servers = list(_running)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


class EmbeddedRedis:
    """redis-server on 127.0.0.1 with no RDB/AOF persistence, as a child process."""

    def __init__(
        self,
        port: int | None = None,
        *,
        work_dir: Path | None = None,
        executable: Path | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self._requested_port = port
        self._port: int | None = port
        self._executable = executable
        self._own_work_dir = work_dir is None
        self._work_dir = work_dir
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: Watchdog | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedServerError("redis has no port yet: call start()")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def managed(self) -> bool:
        return True

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self._dir() / "redis.log"

    def _dir(self) -> Path:
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="sqlproxy-redis-"))
        return self._work_dir

    def start(self) -> Self:
        if self.running:
            return self
        executable = self._executable or find_redis_server()
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(attempts):
            if self._requested_port is None:
                self._port = free_port()
            try:
                self._spawn(executable)
                break
            except EmbeddedServerError as e:
                if attempt + 1 < attempts and "Address already in use" in str(e):
                    continue  # lost the race for an auto-chosen port
                raise
        return self

    def _spawn(self, executable: Path) -> None:
        port = self.port
        log = self.log_path
        log.write_bytes(b"")
        argv = [
            str(executable),
            "--port", str(port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self._dir()),
            "--logfile", str(log),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        while not _ping(self.host, port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with {self._proc.returncode}"
                    if self._proc.poll() is not None
                    else f"no PONG within {self.startup_timeout:.0f}s"
                )
                self._kill()
                text = log.read_text(errors="replace") if log.exists() else ""
                tail = "\n".join(text.splitlines()[-20:])
                raise EmbeddedServerError(
                    f"redis-server on port {port} {why}\nlog: {log}\n--- log tail ---\n{tail}"
                )
            time.sleep(0.05)
        self._watchdog = Watchdog(
            [sys.executable, "-c", f"import os, signal; os.kill({self._proc.pid}, signal.SIGKILL)"]
        )
        with _running_lock:
            _running.add(self)

    def stop(self) -> None:
        """Stop the server and wait for it; a later start() or restart() reuses the port."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill()
        self._proc = None
        if self._watchdog is not None:
            self._watchdog.disarm()
            self._watchdog = None
        with _running_lock:
            _running.discard(self)

    def restart(self) -> Self:
        """Stop and start again on the same port (all data is gone: nothing is persisted)."""
        self.stop()
        self._requested_port = self._port
        return self.start()

    def cleanup(self) -> None:
        """Stop, and remove the work directory if we created it."""
        self.stop()
        if self._own_work_dir and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"EmbeddedRedis({self.url if self._port else 'no port'}, running={self.running})"


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False
