"""SCRAM-SHA-256 against RFC 7677's vector and a verifier made by PostgreSQL 15; MD5."""

from __future__ import annotations

import base64
import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlproxy.protocol.errors import AuthenticationFailed, LocalProtocolError, ProtocolViolation
from sqlproxy.protocol.md5 import (
    is_md5_hash,
    md5_password_hash,
    md5_response,
    md5_response_from_hash,
    md5_verify,
)
from sqlproxy.protocol.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    ScramClient,
    ScramServer,
    ScramVerifier,
    is_scram_verifier,
    make_verifier,
    saslprep,
)

# RFC 7677 section 3.
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# Made by PostgreSQL 15.20: SET password_encryption='scram-sha-256';
# CREATE ROLE tmp_x PASSWORD 'pencil'; SELECT rolpassword FROM pg_authid WHERE rolname='tmp_x'.
PG_VERIFIER = (
    "SCRAM-SHA-256$4096:GY8zrrI9JBTgQCW7KsoTqg==$R25mpsFsokoLkpvo5pyRgRGPBtIaDSYKhcKcm4tjYms="
    ":+dobONe0VOKXKSWs50zF+OmujKTzA+SqXfIABRcnhEY="
)
# Same server, password_encryption='md5', role tmp_y, password 'pencil'.
PG_MD5 = "md5e8b61a0eebc220d604dfa2e4dfa983e1"

CERT_HASH = hashlib.sha256(b"pretend DER certificate").digest()


def rfc_verifier() -> ScramVerifier:
    return ScramVerifier.from_password("pencil", 4096, RFC_SALT)


def test_rfc7677_client_messages() -> None:
    client = ScramClient("pencil", username="user", nonce=RFC_CLIENT_NONCE)
    assert client.select_mechanism([MECHANISM]) == MECHANISM
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.process_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.process_server_final(RFC_SERVER_FINAL)
    assert client.done


def test_rfc7677_server_messages() -> None:
    server = ScramServer(rfc_verifier(), nonce=RFC_SERVER_NONCE)
    assert server.mechanisms == (MECHANISM,)
    assert server.process_client_first(MECHANISM, RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.process_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.done


def test_rfc7677_server_rejects_tampered_proof() -> None:
    server = ScramServer(rfc_verifier(), nonce=RFC_SERVER_NONCE)
    server.process_client_first(MECHANISM, RFC_CLIENT_FIRST)
    bad = RFC_CLIENT_FINAL.replace(b"p=dHzb", b"p=eHzb")
    with pytest.raises(AuthenticationFailed) as info:
        server.process_client_final(bad)
    assert info.value.sqlstate == "28P01"


def test_postgresql_verifier() -> None:
    v = ScramVerifier.parse(PG_VERIFIER)
    assert v.iterations == 4096 and len(v.salt) == 16
    assert str(v) == PG_VERIFIER
    assert v.verify_password("pencil")
    assert not v.verify_password("pencil2")
    assert make_verifier("pencil", salt=v.salt) == PG_VERIFIER
    assert is_scram_verifier(PG_VERIFIER)


def test_round_trip_against_postgresql_verifier() -> None:
    server = ScramServer(PG_VERIFIER)
    client = ScramClient("pencil")
    client.select_mechanism(server.mechanisms)
    sf = server.process_client_first(client.mechanism, client.client_first())
    final = server.process_client_final(client.process_server_first(sf))
    client.process_server_final(final)
    assert client.done and server.done


def exchange(server: ScramServer, client: ScramClient) -> None:
    mech = client.select_mechanism(server.mechanisms)
    sf = server.process_client_first(mech, client.client_first())
    final = server.process_client_final(client.process_server_first(sf))
    client.process_server_final(final)


def test_wrong_password_and_unknown_user_look_alike() -> None:
    real = ScramServer(make_verifier("right", iterations=4096), username="alice")
    with pytest.raises(AuthenticationFailed) as wrong:
        exchange(real, ScramClient("wrong"))
    ghost = ScramServer(None, username="nobody", mock_secret=b"s" * 32)
    with pytest.raises(AuthenticationFailed) as unknown:
        exchange(ghost, ScramClient("anything"))
    assert (wrong.value.sqlstate, wrong.value.message) == (unknown.value.sqlstate, unknown.value.message)


def mock_server_first(user: str, secret: bytes) -> bytes:
    srv = ScramServer(None, username=user, mock_secret=secret, nonce="N")
    return srv.process_client_first(MECHANISM, b"n,,n=,r=C")


def test_mock_salt_is_stable_per_user_and_secret() -> None:
    a1 = mock_server_first("nobody", b"k" * 32)
    assert a1 == mock_server_first("nobody", b"k" * 32)
    assert a1 != mock_server_first("nobody2", b"k" * 32)
    assert a1 != mock_server_first("nobody", b"j" * 32)
    salt = base64.b64decode(a1.split(b",s=")[1].split(b",")[0])
    assert len(salt) == 16 and a1.endswith(b",i=4096")


def test_unparseable_stored_secret_runs_the_mock() -> None:
    srv = ScramServer(PG_MD5, username="tmp_y")
    with pytest.raises(AuthenticationFailed):
        exchange(srv, ScramClient("pencil"))


# --- channel binding -------------------------------------------------------------------------


def test_channel_binding_round_trip() -> None:
    server = ScramServer(make_verifier("pw"), channel_binding=CERT_HASH)
    assert server.mechanisms == (MECHANISM_PLUS, MECHANISM)
    client = ScramClient("pw", channel_binding=CERT_HASH)
    exchange(server, client)
    assert client.mechanism == MECHANISM_PLUS


def test_channel_binding_mismatch_fails() -> None:
    server = ScramServer(make_verifier("pw"), channel_binding=CERT_HASH)
    client = ScramClient("pw", channel_binding=b"\x00" * 32)  # a MITM's certificate
    with pytest.raises(ProtocolViolation, match="channel binding"):
        exchange(server, client)


def test_downgrade_detected() -> None:
    # The client can bind, but -PLUS was stripped from the list it saw: it sends 'y'.
    server = ScramServer(make_verifier("pw"), channel_binding=CERT_HASH)
    client = ScramClient("pw", channel_binding=CERT_HASH)
    client.select_mechanism([MECHANISM])
    with pytest.raises(ProtocolViolation, match="negotiation"):
        server.process_client_first(MECHANISM, client.client_first())


def test_client_y_flag_without_server_binding_is_fine() -> None:
    server = ScramServer(make_verifier("pw"))
    client = ScramClient("pw", channel_binding=CERT_HASH)
    exchange(server, client)
    assert client.mechanism == MECHANISM


# --- malformed client messages ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "data"),
    [
        ("SCRAM-SHA-1", b"n,,n=,r=abc"),
        (MECHANISM, None),
        (MECHANISM, b"\xff\xfe"),
        (MECHANISM, b"n,,n=,"),
        (MECHANISM, b"x,,n=,r=abc"),
        (MECHANISM, b"n,a=admin,n=,r=abc"),
        (MECHANISM, b"n,,m=ext,n=,r=abc"),
        (MECHANISM, b"n,,n=,r="),
        (MECHANISM, b"n,,n=,q=abc"),
        (MECHANISM, b"n,,n=,r=a\x7fb"),
        (MECHANISM, b"p=tls-server-end-point,,n=,r=abc"),  # binding data without -PLUS
        (MECHANISM_PLUS, b"n,,n=,r=abc"),
    ],
)
def test_bad_client_first(mechanism: str, data: bytes | None) -> None:
    server = ScramServer(make_verifier("pw", iterations=1))
    with pytest.raises(ProtocolViolation):
        server.process_client_first(mechanism, data)


def test_unsupported_channel_binding_type() -> None:
    server = ScramServer(make_verifier("pw", iterations=1), channel_binding=CERT_HASH)
    with pytest.raises(ProtocolViolation):
        server.process_client_first(MECHANISM_PLUS, b"p=tls-unique,,n=,r=abc")


@pytest.mark.parametrize(
    "final",
    [
        b"c=biws,r=abcSRV",  # no proof
        b"c=biws,r=abcOTHER,p=" + base64.b64encode(b"x" * 32),  # nonce mismatch
        b"c=eSws,r=abcSRV,p=" + base64.b64encode(b"x" * 32),  # gs2 header mismatch
        b"c=!!!,r=abcSRV,p=" + base64.b64encode(b"x" * 32),
        b"c=biws,r=abcSRV,p=short",
        b"c=biws,r=abcSRV,p=" + base64.b64encode(b"x" * 16),
        b"r=abcSRV,c=biws,p=" + base64.b64encode(b"x" * 32),
        b"p=" + base64.b64encode(b"x" * 32),
    ],
)
def test_bad_client_final(final: bytes) -> None:
    server = ScramServer(make_verifier("pw", iterations=1), nonce="SRV")
    server.process_client_first(MECHANISM, b"n,,n=,r=abc")
    with pytest.raises(ProtocolViolation):
        server.process_client_final(final)


def test_server_call_order_misuse() -> None:
    server = ScramServer(make_verifier("pw", iterations=1))
    with pytest.raises(LocalProtocolError):
        server.process_client_final(b"c=biws")
    server.process_client_first(MECHANISM, b"n,,n=,r=abc")
    with pytest.raises(LocalProtocolError):
        server.process_client_first(MECHANISM, b"n,,n=,r=abc")


# --- malformed server messages (client side) -------------------------------------------------


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=OTHERnonce,s=c2FsdA==,i=4096",  # does not extend our nonce
        b"r=CLI,s=c2FsdA==,i=4096",  # adds nothing
        b"r=CLIx,s=,i=4096",
        b"r=CLIx,s=***,i=4096",
        b"r=CLIx,s=c2FsdA==,i=0",
        b"r=CLIx,s=c2FsdA==,i=-1",
        b"r=CLIx,s=c2FsdA==,i=99999999999",  # more work than we accept
        b"m=ext,r=CLIx,s=c2FsdA==,i=1",
        b"r=CLIx,s=c2FsdA==",
    ],
)
def test_client_rejects_bad_server_first(server_first: bytes) -> None:
    client = ScramClient("pw", nonce="CLI")
    client.client_first()
    with pytest.raises(ProtocolViolation):
        client.process_server_first(server_first)


def test_client_detects_server_that_does_not_know_the_password() -> None:
    client = ScramClient("pencil", username="user", nonce=RFC_CLIENT_NONCE)
    client.client_first()
    client.process_server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthenticationFailed):
        client.process_server_final(b"v=" + base64.b64encode(b"\x00" * 32))


def test_client_server_error_and_misuse() -> None:
    client = ScramClient("pencil", username="user", nonce=RFC_CLIENT_NONCE)
    with pytest.raises(LocalProtocolError):
        client.process_server_first(RFC_SERVER_FIRST)
    client.client_first()
    with pytest.raises(LocalProtocolError):
        client.client_first()
    client.process_server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthenticationFailed, match="invalid-proof"):
        client.process_server_final(b"e=invalid-proof")
    with pytest.raises(ProtocolViolation):
        ScramClient("x").select_mechanism(["GSSAPI"])


# --- verifiers and SASLprep ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abc",
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB",  # keys of the wrong size
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$0:c2FsdA==$" + base64.b64encode(b"k" * 32).decode() * 2,
        "SCRAM-SHA-1$4096:c2FsdA==$AAAA:BBBB",
        PG_VERIFIER + "$",
    ],
)
def test_bad_verifiers(text: str) -> None:
    assert not is_scram_verifier(text)
    with pytest.raises(ValueError):
        ScramVerifier.parse(text)


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("pencil", b"pencil"),
        ("I\u00adX", b"IX"),  # soft hyphen maps to nothing (RFC 4013 example)
        ("\u2168", b"IX"),  # ROMAN NUMERAL NINE normalizes to "IX"
        ("a\u00a0b", b"a b"),  # non-ASCII space maps to SPACE
        ("\u00aa", b"a"),
        ("a\x07", b"a\x07"),  # ASCII is used as is (pg_saslprep fast path)
        ("\u0007\u00e9", "\u0007\u00e9".encode()),  # prohibited: raw bytes are used
        ("\u0627\u0031", "\u0627\u0031".encode()),  # bidi rule broken: raw bytes
    ],
)
def test_saslprep(password: str, prepared: bytes) -> None:
    assert saslprep(password) == prepared


@settings(max_examples=40, deadline=None)
@given(password=st.text(max_size=20), iterations=st.integers(1, 8))
def test_client_server_round_trip(password: str, iterations: int) -> None:
    verifier = ScramVerifier.from_password(password, iterations)
    assert verifier.verify_password(password)
    exchange(ScramServer(verifier), ScramClient(password))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=80))
def test_server_first_step_fuzz(data: bytes) -> None:
    server = ScramServer(make_verifier("pw", iterations=1))
    try:
        server.process_client_first(MECHANISM, data)
    except ProtocolViolation:
        return
    with contextlib.suppress(ProtocolViolation, AuthenticationFailed):
        server.process_client_final(data)


# --- MD5 ------------------------------------------------------------------------------------


def test_md5_hash_matches_postgresql() -> None:
    assert md5_password_hash("tmp_y", "pencil") == PG_MD5
    assert is_md5_hash(PG_MD5)
    assert not is_md5_hash("md5xyz")


def test_md5_exchange() -> None:
    salt = b"\x01\x02\x03\x04"
    # md5(hex(md5("pencil" "tmp_y")) || salt), computed independently here.
    inner = hashlib.md5(b"penciltmp_y", usedforsecurity=False).hexdigest().encode()
    expected = "md5" + hashlib.md5(inner + salt, usedforsecurity=False).hexdigest()
    assert md5_response("tmp_y", "pencil", salt) == expected
    assert md5_response_from_hash(PG_MD5, salt) == expected
    assert md5_verify(PG_MD5, salt, expected)
    assert not md5_verify(PG_MD5, salt, md5_response("tmp_y", "wrong", salt))
    assert not md5_verify(PG_MD5, b"\x00\x00\x00\x00", expected)
    assert not md5_verify(None, salt, expected)
    assert not md5_verify(PG_VERIFIER, salt, expected)


def test_md5_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        md5_response_from_hash("plain", b"salt")
    with pytest.raises(LocalProtocolError):
        md5_response_from_hash(PG_MD5, b"abc")
