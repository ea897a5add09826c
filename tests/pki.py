"""A throwaway certificate authority and a server certificate for 127.0.0.1 / localhost, made
with the openssl command, for the tests of the TLS doors; and client certificates (a CN of
one's choosing, signed by that CA or by the other one) for certificate authentication, and
revocation lists of either CA."""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path  # a CA that did not sign the server certificate
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server certificate and its host name against ``ca``."""
        return ssl.create_default_context(cafile=str(self.ca))

    def client_cert(self, cn: str, *, signer: str = "ca", copy: str = "") -> tuple[Path, Path]:
        """(certificate, key) of a TLS client certificate with subject CN ``cn``, signed by
        ``signer`` ("ca", which signed the server certificate, or "other-ca"); made once.
        Another ``copy`` name makes another certificate (serial number, key) of the same CN."""
        d = self.ca.parent
        name = f"client-{signer}-{cn}" + (f"-{copy}" if copy else "")
        cert, key = d / f"{name}.crt", d / f"{name}.key"
        if not cert.exists():
            _openssl(d, "req", *_EC, "-keyout", key.name, "-out", f"{name}.csr", "-subj", f"/CN={cn}")
            (d / "client.ext").write_text(
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=clientAuth\n"
            )
            _openssl(
                d,
                "x509", "-req", "-in", f"{name}.csr", "-CA", f"{signer}.crt", "-CAkey", f"{signer}.key",
                "-CAcreateserial", "-out", cert.name, "-days", "2", "-extfile", "client.ext",
            )  # fmt: skip
            key.chmod(0o600)  # libpq refuses a key that others may read
        return cert, key

    def crl(self, name: str, *revoked: Path, signer: str = "ca") -> Path:
        """A PEM certificate revocation list of ``signer`` (next update in two days) that
        revokes the ``revoked`` certificates (which it signed), made by `openssl ca` in a
        directory of its own; empty when none are given."""
        d = self.ca.parent / f"crl-{name}"
        d.mkdir()
        (d / "index.txt").write_text("")
        (d / "crlnumber").write_text("01\n")
        (d / "ca.cnf").write_text(
            "[ca]\ndefault_ca = test\n"
            "[test]\ndatabase = index.txt\ncrlnumber = crlnumber\ndefault_md = sha256\n"
            "default_crl_days = 2\n"
        )
        ca = ["-config", "ca.cnf", "-cert", str(self.ca.parent / f"{signer}.crt")]
        ca += ["-keyfile", str(self.ca.parent / f"{signer}.key")]
        for cert in revoked:
            _openssl(d, "ca", *ca, "-revoke", str(cert))
        _openssl(d, "ca", *ca, "-gencrl", "-out", "crl.pem")
        return d / "crl.pem"


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_pki(d: Path) -> Pki:
    ec = _EC
    for name in ("ca", "other-ca"):
        _openssl(
            d,
            "req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
            "-subj", f"/CN=sqlproxy test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
    _openssl(d, "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        d,
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
    )  # fmt: skip
    return Pki(ca=d / "ca.crt", other_ca=d / "other-ca.crt", cert=d / "server.crt", key=d / "server.key")
