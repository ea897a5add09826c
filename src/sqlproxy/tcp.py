"""TCP keepalive and user timeout on the proxy's sockets (``[wire] tcp_*``).

Applied to every client connection the wire listener accepts and every server connection its
pools open, as soon as the connection is made (before TLS, which runs over the same socket), and
to the HTTP and WebSocket doors' upstream connections (asyncpg's pool, execute/upstream.py): so
it lives outside the wire package. The settings sit in [wire] because the wire door's client
sockets were their first use. A dead
peer is then reported by the kernel (ETIMEDOUT) as a lost connection on the existing paths:
the session ends for a vanished client, and a server connection is dropped from its pool with
an 08006 to the client that was using it. Unix-domain sockets are left alone.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from sqlproxy.config.models import WireConfig

log = logging.getLogger(__name__)

_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


@dataclass(frozen=True, slots=True)
class TcpOptions:
    keepalive: bool = True
    keepidle_s: int = 60
    keepintvl_s: int = 10
    keepcnt: int = 6
    user_timeout_ms: int = 0  # 0: the OS default

    @classmethod
    def from_config(cls, c: WireConfig) -> TcpOptions:
        return cls(c.tcp_keepalive, c.tcp_keepidle_s, c.tcp_keepintvl_s, c.tcp_keepcnt, c.tcp_user_timeout_ms)

    def options(self) -> list[tuple[int, int, int]]:
        """(level, option, value) to set; a 0 setting and an option the OS lacks are skipped."""
        out = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if self.keepalive else 0)]
        if self.keepalive:
            for name, value in (
                ("TCP_KEEPIDLE", self.keepidle_s),
                ("TCP_KEEPINTVL", self.keepintvl_s),
                ("TCP_KEEPCNT", self.keepcnt),
            ):
                opt = getattr(socket, name, None)
                if value and opt is not None:
                    out.append((socket.IPPROTO_TCP, opt, value))
        opt = getattr(socket, "TCP_USER_TIMEOUT", None)
        if self.user_timeout_ms and opt is not None:
            out.append((socket.IPPROTO_TCP, opt, self.user_timeout_ms))
        return out

    def apply(self, transport: asyncio.BaseTransport) -> None:
        """Set the options on the transport's socket, when it is a TCP one. Never raises: a
        connection whose peer is already gone fails on its own path."""
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in _TCP_FAMILIES:
            return
        try:
            for level, opt, value in self.options():
                sock.setsockopt(level, opt, value)
        except OSError as e:
            log.info("could not set TCP keepalive options on %s: %s", transport.get_extra_info("peername"), e)
