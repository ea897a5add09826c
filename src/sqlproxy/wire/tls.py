"""The wire door's TLS context, made from the [wire] settings: the server certificate and key,
ALPN "postgresql" as PostgreSQL 17, and for client certificates the CAs and the revocation lists.
Every file that cannot be loaded is a ConfigError naming its key, at start and on a reload."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from sqlproxy.config.loader import ConfigError, ConfigProblem
from sqlproxy.config.models import WireConfig
from sqlproxy.wire.session import ALPN


def _problem(key: str, path: Path, reason: str) -> ConfigError:
    return ConfigError("<config>", [ConfigProblem(key, f"cannot load {path}: {reason}")])


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> str:
    # OpenSSL would otherwise ask for the passphrase on the terminal, blocking the event loop.
    raise _EncryptedKey


def make_ssl_context(c: WireConfig, path_of: Callable[[str], Path]) -> ssl.SSLContext | None:
    """The wire door's TLS context for ``c`` (None without tls_cert), with its files read now;
    ``path_of`` resolves a configured path (relative to state_dir). A file that cannot be
    loaded is a ConfigError naming its key."""
    if c.tls_cert is None or c.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert, key = path_of(c.tls_cert), path_of(c.tls_key)
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_passphrase)
    except _EncryptedKey:
        raise _problem("wire.tls_key", key, "the key is encrypted (no passphrase can be given)") from None
    except (OSError, ssl.SSLError) as e:
        raise _cert_or_key_problem(cert, key, e) from None
    # As PostgreSQL 17: ALPN "postgresql" on every TLS connection; a direct TLS client
    # (sslnegotiation=direct) must have negotiated it (WireSession checks).
    ctx.set_alpn_protocols([ALPN])
    if c.client_ca_file is not None:
        path = path_of(c.client_ca_file)
        try:
            # The only CAs trusted for client certificates: a server-side default context
            # starts with none (the system's are loaded only into contexts that verify
            # from the start), so a certificate from a public CA never names a user here.
            ctx.load_verify_locations(cafile=str(path))
        except (OSError, ssl.SSLError) as e:
            raise _problem("wire.client_ca_file", path, str(e)) from None
        if c.client_crl_file is not None:
            _load_crls(ctx, path_of(c.client_crl_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if c.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def _cert_or_key_problem(cert: Path, key: Path, e: Exception) -> ConfigError:
    """load_cert_chain failed: blame the certificate file when it holds no certificate that
    can be read, else the key (unreadable, not a key, or not the certificate's key)."""
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        scratch.load_verify_locations(cafile=str(cert))
    except (OSError, ssl.SSLError) as ce:
        return _problem("wire.tls_cert", cert, str(ce))
    if not scratch.cert_store_stats()["x509"]:
        return _problem("wire.tls_cert", cert, "no certificate in it")
    return _problem("wire.tls_key", key, f"{e} (tls_key must be the PEM private key of tls_cert)")


def _load_crls(ctx: ssl.SSLContext, path: Path) -> None:
    """Add the CRLs of ``path`` (PEM) to the context's store and check client certificates
    against them: a revoked one then fails the handshake as one of an unknown CA does. Only
    the client's certificate is looked up (VERIFY_CRL_CHECK_LEAF), and OpenSSL then wants a
    valid CRL of its issuer: a certificate whose CA has none here, or only one past its next
    update, fails too. A file that adds certificates is refused: they would become trusted
    client CAs, and those belong in client_ca_file."""

    def problem(reason: str) -> ConfigError:
        return _problem("wire.client_crl_file", path, reason)

    before = ctx.cert_store_stats()
    try:
        ctx.load_verify_locations(cafile=str(path))
    except (OSError, ssl.SSLError) as e:
        raise problem(str(e)) from None
    after = ctx.cert_store_stats()
    if after["x509"] != before["x509"]:
        raise problem("it holds certificates; only CRLs (BEGIN X509 CRL) belong in it")
    if after["crl"] == before["crl"]:
        raise problem("no CRL in it")
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
