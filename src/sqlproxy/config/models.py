"""Typed configuration: one TOML file, validated here. Unknown keys are errors (a typo must not
silently weaken a policy)."""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sqlproxy.ratelimit.config import DistributedRateLimitConfig, RateLimitConfig

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(Strict):
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # Largest request body (HTTP) and SQL text accepted, in bytes.
    max_request_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    max_sql_bytes: Annotated[int, Field(ge=64)] = 262_144
    # Where the proxy keeps its own state (audit store, chain head) when paths are relative.
    state_dir: str = "var"
    # HTTPS and wss:// for the HTTP door: PEM certificate chain and key.
    tls_cert: str | None = None
    tls_key: str | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


class WireConfig(Strict):
    """The PostgreSQL wire-protocol door (clients connect as to PostgreSQL, port 6432)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 6432
    # TLS: PEM certificate chain and key. With require_tls, non-TLS clients are refused. Both
    # the SSLRequest negotiation and PostgreSQL 17's direct TLS (sslnegotiation=direct, ALPN
    # "postgresql") are accepted.
    tls_cert: str | None = None
    tls_key: str | None = None
    require_tls: bool = False
    # Client certificates: the PEM file of the CA(s) that sign them. With it, every TLS client
    # is asked for a certificate, verified against these CAs only (never the system's); users
    # with wire_auth = "cert" or "cert+password" prove their name with it (the certificate's
    # CN must equal the user name). require_client_cert also refuses the TLS handshake of any
    # client without a valid certificate, whatever its user.
    client_ca_file: str | None = None
    require_client_cert: bool = False
    # Certificate revocation lists (PEM, one or more CRLs) of the client_ca_file CAs: a client
    # certificate they revoke fails the TLS handshake as one of an unknown CA does. Only the
    # client's own certificate is checked, and every CA that signs client certificates needs a
    # current CRL here: without one (or with one past its next update) its certificates fail.
    client_crl_file: str | None = None
    # Password methods offered to clients: SCRAM-SHA-256 always; md5 only for users whose
    # configured password is an md5 hash; cleartext only over TLS.
    allow_md5: bool = False
    allow_cleartext_over_tls: bool = False
    # "transaction": a server connection per transaction (PgBouncer's transaction mode);
    # "session": one per client connection.
    pool_mode: Literal["transaction", "session"] = "transaction"
    max_clients: Annotated[int, Field(ge=1)] = 1000
    max_message_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    idle_timeout_s: Annotated[float, Field(ge=0)] = 0.0  # 0 = never
    idle_in_transaction_timeout_s: Annotated[float, Field(ge=0)] = 0.0
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 30.0
    # As PostgreSQL's authentication_timeout: a client that has not finished TLS, startup and
    # authentication within this many seconds is disconnected, giving its slot back.
    startup_timeout_s: Annotated[float, Field(gt=0, le=600)] = 60.0
    # Processes serving wire clients. 1: the proxy's own process serves them. N > 1: N worker
    # processes share the port (SO_REUSEPORT: the kernel spreads new connections over them),
    # so the wire door uses more than one CPU; this process keeps the HTTP door and seals every
    # worker's audit records into the one chain. Each worker has its own server connections
    # (server_pool_size or pool_max per database, per worker) and, without distributed rate
    # limiting, 1/N of every rate limit. Not changed by a reload.
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # Server connections per database for wire clients; None uses the database's pool_max.
    server_pool_size: Annotated[int, Field(ge=1, le=10000)] | None = None
    # TCP keepalive and user timeout (PgBouncer's settings of the same names) on every TCP
    # socket of the wire door: the clients' and the proxy's own server connections; Unix-domain
    # sockets have neither. They find peers that vanished without a FIN or RST (a cut network
    # path, a host that lost power). Keepalive probes an idle connection: with the defaults a
    # dead peer is found about 60 + 6 * 10 = 120 s after the connection went quiet (the OS
    # defaults, 7200 s + 9 * 75 s, take over two hours), and a probe every minute also keeps
    # idle connections open through NAT and load balancers that drop idle flows after minutes.
    # 0 for tcp_keepidle_s, tcp_keepintvl_s or tcp_keepcnt leaves that one at the OS default.
    tcp_keepalive: bool = True
    tcp_keepidle_s: Annotated[int, Field(ge=0, le=32767)] = 60
    tcp_keepintvl_s: Annotated[int, Field(ge=0, le=32767)] = 10
    tcp_keepcnt: Annotated[int, Field(ge=0, le=127)] = 6
    # How long data sent may stay unacknowledged before the OS drops the connection
    # (TCP_USER_TIMEOUT, milliseconds; 0 = the OS default, about 15 minutes of retransmission).
    # Keepalive does not cover this case: a query written to a server behind a dead path.
    # On Linux it also replaces tcp_keepcnt: an idle connection is dropped once a probe went
    # unanswered and this long has passed without hearing from the peer.
    tcp_user_timeout_ms: Annotated[int, Field(ge=0, le=3_600_000)] = 0

    @field_validator("client_crl_file")
    @classmethod
    def _crl_needs_ca(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("client_ca_file") is None:
            raise ValueError("needs client_ca_file (the CAs whose certificates the CRLs revoke)")
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> WireConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.require_tls and self.tls_cert is None:
            raise ValueError("require_tls needs tls_cert and tls_key")
        if self.client_ca_file is not None and self.tls_cert is None:
            raise ValueError("client_ca_file needs tls_cert and tls_key: certificates come only over TLS")
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError("require_client_cert needs client_ca_file (the CA of the client certificates)")
        if self.require_client_cert and not self.require_tls:
            raise ValueError(
                "require_client_cert needs require_tls = true: a client without TLS presents no certificate"
            )
        return self


class DatabaseConfig(Strict):
    """An upstream PostgreSQL database. Clients name it by the key under [databases]."""

    dsn: str = Field(description="libpq URL of the upstream, with the proxy's own credentials")
    pool_min: Annotated[int, Field(ge=0, le=1000)] = 1
    pool_max: Annotated[int, Field(ge=1, le=1000)] = 10
    connect_timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    statement_timeout_ms: Annotated[int, Field(ge=0)] = 30_000
    max_result_rows: Annotated[int, Field(ge=1)] = 10_000
    search_path: tuple[str, ...] = ("public",)
    # Optional region tag (data residency, later).
    region: str | None = None

    @model_validator(mode="after")
    def _pool_bounds(self) -> DatabaseConfig:
        if self.pool_min > self.pool_max:
            raise ValueError(f"pool_min ({self.pool_min}) is larger than pool_max ({self.pool_max})")
        return self

    @field_validator("dsn")
    @classmethod
    def _dsn_scheme(cls, v: str) -> str:
        if not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return v


class UserConfig(Strict):
    """A user. Identity comes only from a secret: an API key (HTTP, WebSocket) or a password (wire).

    Secrets are never stored in clear: ``api_key_sha256`` holds the hex SHA-256 of the key
    (``sqlproxy hash-key`` prints it), or ``api_key_env`` names an environment variable holding the
    key itself. ``password`` is a PostgreSQL SCRAM-SHA-256 verifier (``SCRAM-SHA-256$...``) or an
    MD5 hash (``md5...``), as in pg_authid.
    """

    roles: tuple[str, ...] = ()
    attributes: dict[str, str | int | float | bool] = Field(default_factory=dict)
    api_key_sha256: str | None = None
    api_key_env: str | None = None
    password: str | None = None
    # How the user logs in on the wire door: "password" (the default); "cert", a TLS client
    # certificate signed by [wire] client_ca_file whose CN is the user name, and no password;
    # "cert+password", both (PostgreSQL's clientcert=verify-full with a password method).
    wire_auth: Literal["password", "cert", "cert+password"] = "password"
    allowed_cidrs: tuple[str, ...] = ()
    disabled: bool = False

    @field_validator("api_key_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be 64 lower-case hex digits (sqlproxy hash-key KEY prints it)")
        return v

    @field_validator("password")
    @classmethod
    def _verifier(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("SCRAM-SHA-256$") or re.fullmatch(r"md5[0-9a-f]{32}", v)):
            raise ValueError("must be a SCRAM-SHA-256 verifier or an md5 hash (sqlproxy hash-password)")
        return v

    @model_validator(mode="after")
    def _wire_auth(self) -> UserConfig:
        if self.wire_auth == "cert" and self.password is not None:
            raise ValueError(
                "password is never asked with wire_auth = 'cert': remove it, "
                "or use wire_auth = 'cert+password' to require both"
            )
        if self.wire_auth == "cert+password" and self.password is None:
            raise ValueError("wire_auth = 'cert+password' needs password")
        return self

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for c in v:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError as e:
                raise ValueError(f"{c!r} is not an IP network: {e}") from None
        return v


class RoleConfig(Strict):
    description: str = ""
    # May use the admin endpoints and read every user's audit records.
    admin: bool = False
    # May read every user's audit records (auditors), without the admin endpoints.
    audit_all: bool = False


class Action(StrEnum):
    ALLOW = "allow"
    BLOCK = "block"
    MASK = "mask"


class MaskKind(StrEnum):
    REDACT = "redact"  # the whole value replaced by a fixed marker
    PARTIAL = "partial"  # keep a little (last 4 digits, e-mail domain)
    HASH = "hash"  # keyed hash: joins still work, values do not show
    NULL = "null"


class PolicyRule(Strict):
    """One rule. Scope narrows from database to column; ``*`` matches anything at that level,
    and glob patterns (``order*``) are allowed. The most specific matching rule wins; at equal
    specificity block beats allow; no matching rule means deny."""

    name: str
    description: str = ""
    users: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    database: str = "*"
    schema_: str = Field(default="*", alias="schema")
    table: str = "*"
    columns: tuple[str, ...] = ()
    # Access modes on relations: read, insert, update, delete, truncate, ddl; "*" for all.
    access: tuple[str, ...] = ("*",)
    # Statement kinds or categories (read, dml, ddl, utility); "*" for all. Dangerous statements
    # and functions are never matched by "*": a rule must name them.
    statements: tuple[str, ...] = ("*",)
    # Functions this rule allows or blocks by name (for dangerous functions).
    functions: tuple[str, ...] = ()
    action: Action
    mask: MaskKind | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _coherent(self) -> PolicyRule:
        if not self.users and not self.roles:
            raise ValueError("a rule must name users or roles (use users = ['*'] for everyone)")
        if self.action is Action.MASK:
            if not self.columns:
                raise ValueError("action 'mask' needs columns")
            if self.mask is None:
                raise ValueError("action 'mask' needs mask = redact | partial | hash | null")
        elif self.mask is not None:
            raise ValueError("mask is only valid with action = 'mask'")
        if self.columns and self.table == "*":
            raise ValueError("columns need a table (or a table pattern)")
        return self


class RowFilter(Strict):
    """A predicate ANDed onto every reference to the table, for the named users/roles.
    ``{user.NAME}`` in the predicate is replaced by the user's attribute NAME as a quoted SQL
    literal (``{user.name}`` is the user name)."""

    name: str
    users: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    database: str = "*"
    schema_: str = Field(default="public", alias="schema")
    table: str
    predicate: str

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _who(self) -> RowFilter:
        if not self.users and not self.roles:
            raise ValueError("a row filter must name users or roles")
        return self


class ColumnClassification(Strict):
    """Declares that columns matching the pattern (``schema.table.column`` globs) hold a class."""

    columns: str
    classification: str

    @field_validator("columns")
    @classmethod
    def _pattern(cls, v: str) -> str:
        parts = v.split(".")
        if not 1 <= len(parts) <= 3 or any(not p.strip() for p in parts):
            raise ValueError("must be column, table.column or schema.table.column (globs allowed)")
        return v


class ClassificationConfig(Strict):
    enabled: bool = True
    rules: tuple[ColumnClassification, ...] = ()
    # How many result rows value detectors look at.
    sample_rows: Annotated[int, Field(ge=0, le=10_000)] = 20
    # Fraction of non-null sampled values that must match for a column to be classified.
    min_match_ratio: Annotated[float, Field(gt=0, le=1)] = 0.6


class AuditConfig(Strict):
    jsonl_path: str | None = "audit/audit.jsonl"
    rotate_bytes: Annotated[int, Field(ge=4096)] = 64 * 1024 * 1024
    keep_files: Annotated[int, Field(ge=1)] = 10
    # sqlite:///path (relative to state_dir) or postgresql://...
    store: str = "sqlite:///audit/audit.db"
    # The HMAC key for the hash chain: from an environment variable or a file; when neither is
    # given a key is generated once into state_dir/audit/chain.key.
    hmac_key_env: str | None = None
    hmac_key_file: str | None = None
    redact_literals: bool = False
    queue_size: Annotated[int, Field(ge=1)] = 10_000
    batch_size: Annotated[int, Field(ge=1)] = 500
    # Write a SQLite store and the JSONL files from a child process (true) or from a worker
    # thread of the proxy (false). The process keeps the disk writes off the interpreter lock
    # the event loop needs: about a quarter less proxy CPU per statement under load.
    writer_process: bool = True


class AuthConfig(Strict):
    lockout_threshold: Annotated[int, Field(ge=1)] = 5
    lockout_window_s: Annotated[float, Field(gt=0)] = 300.0
    lockout_duration_s: Annotated[float, Field(gt=0)] = 300.0


class StreamConfig(Strict):
    """The WebSocket stream door (/api/v1/stream) and its cross-node fan-out."""

    enabled: bool = True
    # Names this node in audit events and resume cursors; default: made once and kept in state_dir.
    node_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    heartbeat_s: Annotated[float, Field(gt=0)] = 15.0
    auth_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # Audit records buffered per subscription; a subscriber further behind is closed as lagging.
    queue_records: Annotated[int, Field(ge=1)] = 10_000
    max_connections: Annotated[int, Field(ge=1)] = 1000
    max_subscriptions: Annotated[int, Field(ge=1)] = 32
    max_frame_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    # Rows one query subscription may stream; None means no cap (the client may set its own).
    query_max_rows: Annotated[int, Field(ge=1)] | None = None
    query_max_batch_rows: Annotated[int, Field(ge=1)] = 10_000
    # A query left without credit this long is cancelled (it holds a connection and a snapshot).
    query_idle_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    metrics_min_interval_ms: Annotated[int, Field(ge=10)] = 100
    # Cross-node fan-out of audit events through Redis streams; off unless a URL is given.
    redis_url: str | None = None
    redis_prefix: str = "sqlproxy"
    redis_retention: Annotated[int, Field(ge=100)] = 100_000


class ProxyConfig(Strict):
    server: ServerConfig = ServerConfig()
    wire: WireConfig = WireConfig()
    databases: dict[str, DatabaseConfig] = Field(default_factory=dict)
    default_database: str | None = None
    users: dict[str, UserConfig] = Field(default_factory=dict)
    roles: dict[str, RoleConfig] = Field(default_factory=dict)
    policies: tuple[PolicyRule, ...] = ()
    row_filters: tuple[RowFilter, ...] = ()
    classification: ClassificationConfig = ClassificationConfig()
    audit: AuditConfig = AuditConfig()
    auth: AuthConfig = AuthConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    distributed_rate_limiting: DistributedRateLimitConfig = DistributedRateLimitConfig()
    stream: StreamConfig = StreamConfig()
    # With no [databases], start an embedded PostgreSQL with the demo schema ("demo"), or refuse.
    embedded: Literal["demo", "off"] = "demo"

    @model_validator(mode="after")
    def _references(self) -> ProxyConfig:
        for uname, u in self.users.items():
            if not _NAME.match(uname):
                raise ValueError(f"users.{uname}: not a valid user name")
            for r in u.roles:
                if r not in self.roles:
                    raise ValueError(f"users.{uname}.roles: unknown role {r!r}")
            if u.wire_auth != "password" and self.wire.client_ca_file is None:
                raise ValueError(
                    f"users.{uname}.wire_auth: {u.wire_auth!r} needs [wire] client_ca_file "
                    "(the CA that signs client certificates)"
                )
        for r in self.rate_limits.roles:
            if r not in self.roles:
                raise ValueError(f"rate_limits.roles.{r}: unknown role")
        if self.default_database is not None and self.default_database not in self.databases:
            raise ValueError(f"default_database: {self.default_database!r} is not under [databases]")
        names: set[str] = set()
        for i, p in enumerate(self.policies):
            if p.name in names:
                raise ValueError(f"policies.{i}.name: duplicate rule name {p.name!r}")
            names.add(p.name)
            for r in p.roles:
                if r != "*" and r not in self.roles:
                    raise ValueError(f"policies.{i}.roles: unknown role {r!r}")
        return self

    def database_names(self) -> list[str]:
        return list(self.databases)

    def resolve_database(self, name: str | None) -> str | None:
        if name:
            return name if name in self.databases else None
        if self.default_database:
            return self.default_database
        return next(iter(self.databases), None)
