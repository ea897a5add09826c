"""[wire] tcp_* settings: validation with the key named, and the socket options they become
(set on a real socket pair and read back with getsockopt)."""

from __future__ import annotations

import socket

import pytest

from sqlproxy.config.loader import ConfigError, parse_config
from sqlproxy.config.models import WireConfig
from sqlproxy.tcp import TcpOptions
from tests.tcp_checks import tcp_options_of


def test_defaults_turn_keepalive_on_with_production_timings() -> None:
    c = WireConfig()
    assert (c.tcp_keepalive, c.tcp_keepidle_s, c.tcp_keepintvl_s, c.tcp_keepcnt) == (True, 60, 10, 6)
    assert c.tcp_user_timeout_ms == 0
    assert TcpOptions.from_config(c) == TcpOptions()


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("tcp_keepidle_s", -1, "greater than or equal to 0"),
        ("tcp_keepidle_s", 32768, "less than or equal to 32767"),
        ("tcp_keepintvl_s", 40000, "less than or equal to 32767"),
        ("tcp_keepcnt", 128, "less than or equal to 127"),
        ("tcp_user_timeout_ms", -5, "greater than or equal to 0"),
        ("tcp_user_timeout_ms", 3_600_001, "less than or equal to 3600000"),
        ("tcp_keepidle_s", 1.5, "valid integer"),
        ("tcp_keepalive", "sometimes", "valid boolean"),
    ],
)
def test_out_of_range_settings_name_the_key(key: str, value: object, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"wire": {key: value}})
    (problem,) = e.value.problems
    assert problem.path == f"wire.{key}"
    assert reason in problem.reason


def test_misspelt_key_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"wire": {"tcp_keepidle": 30}})  # PgBouncer's spelling, without the unit
    assert [(p.path, p.reason) for p in e.value.problems] == [("wire.tcp_keepidle", "unknown key (typo?)")]


def _pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    lst = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lst.getsockname())
    b, _ = lst.accept()
    return lst, a, b


class _Transport:
    """Just enough of a transport for TcpOptions.apply: the real socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None


def test_options_set_on_a_tcp_socket_and_zero_leaves_the_os_default() -> None:
    lst, a, b = _pair()
    try:
        before = tcp_options_of(b)
        TcpOptions(True, 17, 3, 4, 2500).apply(_Transport(a))  # type: ignore[arg-type]
        assert tcp_options_of(a) == (1, 17, 3, 4, 2500)
        TcpOptions(True, 0, 0, 0, 0).apply(_Transport(b))  # type: ignore[arg-type]
        assert tcp_options_of(b) == (1, *before[1:])
        TcpOptions(False, 17, 3, 4, 0).apply(_Transport(a))  # type: ignore[arg-type]
        assert tcp_options_of(a)[0] == 0
    finally:
        for s in (a, b, lst):
            s.close()


def test_unix_domain_sockets_are_left_alone() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        TcpOptions(True, 17, 3, 4, 2500).apply(_Transport(a))  # type: ignore[arg-type]
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        a.close()
        b.close()
