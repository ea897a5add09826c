"""A network path a test can cut silently, for dead-peer tests (no FIN, no RST, no ICMP).

:class:`CutPath` makes a network namespace of its own, joined to this one by a veth pair with
a link-local /30 (``near`` here, ``far`` in the namespace) and static neighbour entries (no
ARP, so no "host unreachable" when the path is cut). Sockets made with :meth:`socket_in_far`
live in the namespace; everything else stays in the test process's own namespace.
:meth:`cut` sets the far end down: what either side sends from then on is dropped without a
trace, as on a cut cable, and only the senders' timers (TCP keepalive, TCP_USER_TIMEOUT)
find out. :class:`Relay` forwards TCP connections accepted on ``far`` to an address here (the
test's PostgreSQL), so a server connection of the proxy can be made to cross the path.

Needs root and iproute2 (`ip`); traffic stays on this machine, inside the pair. The namespace
and the pair are removed on close, and ones left behind by a killed test process (their
names carry its pid) are removed by the next :meth:`CutPath.create`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import threading
import uuid

import pytest

_CLONE_NEWNET = 0x40000000
_PREFIX = "sqlpka"
_STALE = re.compile(rf"^{_PREFIX}-(\d+)-([0-9a-f]{{6}})\b")


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale() -> None:
    for line in _ip("netns", "list", check=False).splitlines():
        m = _STALE.match(line)
        if m and not _alive(int(m.group(1))):
            _ip("link", "del", f"{_PREFIX}{m.group(2)}a", check=False)
            _ip("netns", "del", line.split()[0], check=False)


def _used_subnets() -> set[tuple[int, int]]:
    used: set[tuple[int, int]] = set()
    for m in re.finditer(r"inet 169\.254\.(\d+)\.(\d+)/", _ip("-4", "addr", check=False)):
        used.add((int(m.group(1)), int(m.group(2)) & ~3))
    return used


def require_netns() -> None:
    """Skip unless this process can make network namespaces (root, with `ip`)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("dead-path tests need root and iproute2 (ip) for a network namespace")


class CutPath:
    def __init__(self, tag: str, near: str, far: str) -> None:
        self.ns = f"{_PREFIX}-{os.getpid()}-{tag}"
        self.near_dev = f"{_PREFIX}{tag}a"
        self.far_dev = f"{_PREFIX}{tag}b"
        self.near = near
        self.far = far
        self._near_mac = f"02:5a:{tag[0:2]}:{tag[2:4]}:{tag[4:6]}:01"
        self._far_mac = f"02:5a:{tag[0:2]}:{tag[2:4]}:{tag[4:6]}:02"

    @classmethod
    def create(cls) -> CutPath:
        _sweep_stale()
        used = _used_subnets()
        rng = random.Random()
        while True:
            third, fourth = rng.choice([n for n in range(1, 255) if n != 169]), rng.randrange(0, 256, 4)
            if (third, fourth) not in used:
                break
        path = cls(uuid.uuid4().hex[:6], f"169.254.{third}.{fourth + 1}", f"169.254.{third}.{fourth + 2}")
        try:
            path._build()
        except BaseException:
            path.close()
            raise
        return path

    def _build(self) -> None:
        _ip("netns", "add", self.ns)
        _ip(
            "link", "add", self.near_dev, "address", self._near_mac, "type", "veth",
            "peer", "name", self.far_dev, "address", self._far_mac, "netns", self.ns,
        )  # fmt: skip
        _ip("addr", "add", f"{self.near}/30", "dev", self.near_dev)
        _ip("-n", self.ns, "addr", "add", f"{self.far}/30", "dev", self.far_dev)
        _ip("link", "set", self.near_dev, "up")
        self._far_up()

    def _far_up(self) -> None:
        _ip("-n", self.ns, "link", "set", self.far_dev, "up")
        # Static neighbours: no ARP that could fail and report the path dead on its own.
        _ip("neigh", "replace", self.far, "lladdr", self._far_mac, "dev", self.near_dev, "nud", "permanent")
        _ip("-n", self.ns, "neigh", "replace", self.near, "lladdr", self._near_mac, "dev", self.far_dev,
            "nud", "permanent")  # fmt: skip

    def cut(self) -> None:
        """Drop everything on the path from now on, silently, both ways."""
        _ip("-n", self.ns, "link", "set", self.far_dev, "down")

    def mend(self) -> None:
        self._far_up()

    def socket_in_far(self) -> socket.socket:
        """A new TCP socket in the far namespace (made by a thread that enters it and ends)."""
        made: list[socket.socket] = []
        failed: list[BaseException] = []

        def make() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns: {os.strerror(err)}")
                finally:
                    os.close(fd)
                made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            except BaseException as e:  # handed to the caller
                failed.append(e)

        t = threading.Thread(target=make, name="netns-socket")
        t.start()
        t.join()
        if failed:
            raise failed[0]
        return made[0]

    def close(self) -> None:
        # Deleting the near end deletes the pair at once; the namespace itself goes when the
        # last socket in it is closed.
        _ip("link", "del", self.near_dev, check=False)
        _ip("netns", "del", self.ns, check=False)


def hard_close(transport: asyncio.WriteTransport) -> None:
    """Close with a RST (SO_LINGER 0): no FIN left retransmitting on a cut path, holding the
    namespace after the test."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Relay:
    """Accepts TCP connections on ``path.far`` and pipes each to ``(host, port)`` here."""

    def __init__(self, path: CutPath, host: str, port: int) -> None:
        self.path = path
        self.target = (host, port)
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Relay:
        sock = self.path.socket_in_far()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.path.far, 0))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._serve, sock=sock)
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(w)
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            w.transport.abort()
            return
        self._writers.add(uw)
        for src, dst in ((r, uw), (ur, w)):
            task = asyncio.create_task(self._pipe(src, dst, uw if dst is w else w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, other: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.transport.abort()
            other.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            hard_close(w.transport)
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
