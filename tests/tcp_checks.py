"""Reading a socket's keepalive and user-timeout options back, for the TcpOptions tests."""

from __future__ import annotations

import socket


def tcp_options_of(sock: socket.socket) -> tuple[int, int, int, int, int]:
    """(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT) as set now."""
    t = socket.IPPROTO_TCP
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(t, socket.TCP_KEEPIDLE),
        sock.getsockopt(t, socket.TCP_KEEPINTVL),
        sock.getsockopt(t, socket.TCP_KEEPCNT),
        sock.getsockopt(t, socket.TCP_USER_TIMEOUT),
    )
