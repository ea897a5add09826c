"""Configuration of the rate limiter: ``[rate_limits]`` (the hierarchy of token buckets) and
``[distributed_rate_limiting]`` (sharing the budgets across proxy nodes through Redis).

Both default to "off": with no limits configured every request passes and nothing is kept."""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limit(_Strict):
    """A token bucket: ``rate`` requests per second sustained, ``burst`` at once (default: one
    second's worth, at least 1)."""

    rate: Annotated[float, Field(gt=0)]
    burst: Annotated[float, Field(ge=1)] | None = None

    @property
    def capacity(self) -> float:
        return self.burst if self.burst is not None else max(1.0, self.rate)

    def describe(self) -> str:
        return f"{self.rate:g}/s, burst {self.capacity:g}"


class RateLimitConfig(_Strict):
    """Four levels; a request must pass every level that has a limit.

    - global: every request through this proxy (the whole cluster when distributed)
    - user: per user. ``users.NAME`` wins; otherwise the most generous of ``roles.ROLE`` over the
      user's roles (roles are grants, so a user gets the best of them); otherwise ``user_default``.
    - database: per upstream database. ``databases.NAME``, else ``database_default``.
    - user_database: per (user, database) pair. ``user_databases.USER.DATABASE``, else
      ``user_database_default``.
    """

    enabled: bool = True
    global_: Limit | None = Field(default=None, alias="global")
    user_default: Limit | None = None
    roles: dict[str, Limit] = Field(default_factory=dict)
    users: dict[str, Limit] = Field(default_factory=dict)
    database_default: Limit | None = None
    databases: dict[str, Limit] = Field(default_factory=dict)
    user_database_default: Limit | None = None
    user_databases: dict[str, dict[str, Limit]] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @cached_property
    def any_limit(self) -> bool:  # frozen: read on every request, computed once
        return self.enabled and any(
            (
                self.global_,
                self.user_default,
                self.roles,
                self.users,
                self.database_default,
                self.databases,
                self.user_database_default,
                self.user_databases,
            )
        )


class DistributedRateLimitConfig(_Strict):
    """Share the ``[rate_limits]`` budgets across every proxy node using the same Redis."""

    enabled: bool = False
    backend: Literal["redis"] = "redis"
    url: str = "redis://127.0.0.1:6379/0"
    # Keys in Redis start with this; proxies with different prefixes are separate clusters.
    key_prefix: str = "sqlproxy:rl"
    # Defaults to host-pid-random; must be unique per running node.
    node_id: str | None = None
    # Report usage, renew the heartbeat and fetch rebalanced shares this often.
    sync_interval_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    # A node whose heartbeat is older than this is considered gone and its share is handed out.
    # Default: three sync intervals.
    node_ttl_s: Annotated[float, Field(gt=0)] | None = None
    # Idle budget is handed to the shared pool this often (only when there is some to give).
    donate_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.25
    # After a borrow found nothing to lend, do not ask Redis again for this long (per bucket):
    # a saturated cluster must not turn every rejected request into a Redis round trip.
    borrow_backoff_s: Annotated[float, Field(ge=0, le=60)] = 0.05
    # Redis round trips on the request path must fail fast so that an outage costs little.
    socket_timeout_s: Annotated[float, Field(gt=0, le=30)] = 0.25
    # When Redis was never reached, assume this many nodes for the static 1/N fallback share.
    assumed_nodes: Annotated[int, Field(ge=1)] = 1
    # Nodes whose demand is below their fair share get this much headroom over their demand.
    demand_headroom: Annotated[float, Field(ge=1.0, le=10.0)] = 1.25

    @property
    def ttl_s(self) -> float:
        return self.node_ttl_s if self.node_ttl_s is not None else 3.0 * self.sync_interval_s

    @model_validator(mode="after")
    def _url(self) -> DistributedRateLimitConfig:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("url: must be a redis://, rediss:// or unix:// URL")
        if self.node_ttl_s is not None and self.node_ttl_s <= self.sync_interval_s:
            raise ValueError("node_ttl_s must be longer than sync_interval_s")
        return self
