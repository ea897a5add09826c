"""Process helpers shared by the embedded servers: free ports, privilege drop, a death watchdog."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The Debian package's user first; our own system user when that package is absent.
_CANDIDATE_USERS = ("postgres", "sqlproxy-test")


class EmbeddedServerError(RuntimeError):
    """A server we start ourselves could not be started, reached or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on `host`.

    There is a window between closing this socket and the server binding the port; callers that
    chose the port this way retry with a new one when the server fails to bind.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class RunAs:
    """How to run a command that refuses to run as root (initdb, pg_ctl, postgres)."""

    user: str | None  # None: run directly, we are not root
    uid: int
    gid: int

    @classmethod
    def current(cls) -> RunAs:
        return cls(user=None, uid=os.getuid(), gid=os.getgid())

    @classmethod
    def unprivileged(cls) -> RunAs:
        """Ourselves when not root; else the `postgres` system user, created if need be."""
        if os.geteuid() != 0:
            return cls.current()
        for name in _CANDIDATE_USERS:
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return cls(user=name, uid=entry.pw_uid, gid=entry.pw_gid)
        name = _CANDIDATE_USERS[-1]
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        proc = subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode not in (0, 9):  # 9: created meanwhile by a concurrent run
            raise EmbeddedServerError(
                f"running as root and no 'postgres' user exists; `useradd {name}` failed: "
                f"{proc.stderr.strip()}"
            )
        entry = pwd.getpwnam(name)
        return cls(user=name, uid=entry.pw_uid, gid=entry.pw_gid)

    def argv(self, argv: Sequence[str]) -> list[str]:
        if self.user is None:
            return list(argv)
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        return [runuser, "-u", self.user, "--", *argv]

    def own(self, path: Path) -> None:
        """Give `path` to the run-as user (a no-op when we are that user)."""
        if self.user is not None:
            os.chown(path, self.uid, self.gid)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Server tools write to stderr in the user's locale and look at HOME; keep both sane for
        # a user whose home may not exist.
        env.setdefault("LC_ALL", "C.UTF-8")
        if self.user is not None:
            env["HOME"] = "/"
            env.pop("PGPASSFILE", None)
        for var in ("PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE"):
            env.pop(var, None)
        return env


class Watchdog:
    """Runs a cleanup command if this process dies without stopping its server.

    pg_ctl detaches postgres into its own session, and redis-server outlives a SIGKILLed parent,
    so atexit alone leaks servers when the test run is killed. The watchdog is a separate small
    process holding the read end of a pipe: EOF without a prior "disarm" means we died.
    """

    def __init__(self, cleanup: Sequence[str], env: dict[str, str] | None = None) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_watchdog.py")), json.dumps(list(cleanup))],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            # Its own session: a Ctrl-C sent to our process group must not take it down first.
            start_new_session=True,
        )

    def disarm(self) -> None:
        stdin = self._proc.stdin
        if stdin is None or stdin.closed:
            return
        try:
            stdin.write(b"disarm\n")
            stdin.flush()
            stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
