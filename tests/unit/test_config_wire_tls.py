"""The [wire] TLS keys and the users' wire_auth: what is accepted, and config errors that name
the key and the reason."""

from __future__ import annotations

from typing import Any

import pytest

from sqlproxy.auth.users import UserDirectory
from sqlproxy.config.loader import ConfigError, parse_config
from sqlproxy.protocol.scram import make_verifier

TLS = {"tls_cert": "wire.crt", "tls_key": "wire.key"}
VERIFIER = make_verifier("secret", iterations=4096)


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    return [str(p) for p in ei.value.problems]


def test_certificate_users_accepted() -> None:
    cfg = parse_config(
        {
            "wire": {**TLS, "client_ca_file": "clients-ca.crt"},
            "users": {
                "alice": {"wire_auth": "cert"},
                "bob": {"wire_auth": "cert+password", "password": VERIFIER},
                "carol": {"password": VERIFIER},
            },
        }
    )
    assert cfg.wire.client_ca_file == "clients-ca.crt"
    assert cfg.wire.client_crl_file is None
    assert not cfg.wire.require_client_cert
    users = UserDirectory(cfg, env={})
    assert users.wire_auth("alice") == "cert"
    assert users.wire_auth("bob") == "cert+password"
    assert users.wire_auth("carol") == "password"
    assert users.wire_auth("nobody") == "password"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"users": {"alice": {"wire_auth": "cert"}}},
            "users.alice.wire_auth: 'cert' needs [wire] client_ca_file",
        ),
        (
            {"users": {"bob": {"wire_auth": "cert+password", "password": VERIFIER}}},
            "users.bob.wire_auth: 'cert+password' needs [wire] client_ca_file",
        ),
        (
            {
                "wire": {**TLS, "client_ca_file": "ca.crt"},
                "users": {"alice": {"wire_auth": "cert", "password": VERIFIER}},
            },
            "users.alice: password is never asked with wire_auth = 'cert'",
        ),
        (
            {"wire": {**TLS, "client_ca_file": "ca.crt"}, "users": {"bob": {"wire_auth": "cert+password"}}},
            "users.bob: wire_auth = 'cert+password' needs password",
        ),
        ({"users": {"alice": {"wire_auth": "certificate"}}}, "users.alice.wire_auth: Input should be"),
        ({"wire": {"client_ca_file": "ca.crt"}}, "wire: client_ca_file needs tls_cert and tls_key"),
        (
            {"wire": {**TLS, "require_tls": True, "require_client_cert": True}},
            "wire: require_client_cert needs client_ca_file",
        ),
        (
            {"wire": {**TLS, "client_ca_file": "ca.crt", "require_client_cert": True}},
            "wire: require_client_cert needs require_tls = true",
        ),
        (
            {"wire": {**TLS, "client_crl_file": "clients.crl"}},
            "wire.client_crl_file: needs client_ca_file",
        ),
    ],
)
def test_errors_name_the_key_and_the_reason(data: dict[str, Any], expected: str) -> None:
    problems = _problems(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_crl_file_with_its_ca_file() -> None:
    cfg = parse_config({"wire": {**TLS, "client_ca_file": "ca.crt", "client_crl_file": "ca.crl"}})
    assert cfg.wire.client_crl_file == "ca.crl"
