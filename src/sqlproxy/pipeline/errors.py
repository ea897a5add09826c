"""The proxy's error kinds. Each door renders them its own way (HTTP status + JSON, or an
ErrorResponse with the SQLSTATE), but the pipeline decides them once."""

from __future__ import annotations


class ProxyError(Exception):
    """A request that did not succeed. ``decision`` is what the audit record says."""

    code = "error"
    http_status = 500
    sqlstate = "XX000"
    decision = "error"

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        rule: str | None = None,
        detail: str | None = None,
        position: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate
        self.rule = rule
        self.detail = detail
        self.position = position
        self.retry_after = retry_after

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code, "message": self.message, "sqlstate": self.sqlstate}
        if self.rule is not None:
            body["rule"] = self.rule
        if self.detail is not None:
            body["detail"] = self.detail
        if self.position is not None:
            body["position"] = self.position
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


class Unauthenticated(ProxyError):
    code = "unauthenticated"
    http_status = 401
    sqlstate = "28000"
    decision = "unauthenticated"


class SourceNotAllowed(Unauthenticated):
    code = "source_not_allowed"
    http_status = 403


class Denied(ProxyError):
    code = "denied"
    http_status = 403
    sqlstate = "42501"
    decision = "deny"


class BadRequest(ProxyError):
    code = "bad_request"
    http_status = 400
    sqlstate = "22023"
    decision = "bad_request"


class SqlSyntax(BadRequest):
    code = "syntax_error"
    sqlstate = "42601"


class UnknownDatabase(BadRequest):
    code = "unknown_database"
    http_status = 404
    sqlstate = "3D000"


class TooLarge(ProxyError):
    code = "too_large"
    http_status = 413
    sqlstate = "54000"
    decision = "bad_request"


class RateLimited(ProxyError):
    code = "rate_limited"
    http_status = 429
    # PostgreSQL has no rate-limit SQLSTATE; 53400 (configuration_limit_exceeded) is the closest
    # class-53 "insufficient resources" code and is what clients already treat as retryable.
    sqlstate = "53400"
    decision = "rate_limited"


class UpstreamUnavailable(ProxyError):
    code = "upstream_unavailable"
    http_status = 503
    sqlstate = "08006"


class UpstreamTimeout(ProxyError):
    code = "timeout"
    http_status = 504
    sqlstate = "57014"


class UpstreamError(ProxyError):
    """PostgreSQL rejected the statement (constraint, type error, ...): its SQLSTATE is kept."""

    code = "query_error"
    http_status = 400
