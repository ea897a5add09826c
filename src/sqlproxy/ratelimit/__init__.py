"""Rate limiting: hierarchical token buckets (global, per user, per database, per user per
database) and the distributed two-tier limiter on Redis. Rejections are ``RateLimited``:
HTTP 429 + Retry-After, SQLSTATE 53400 on the wire."""

from sqlproxy.ratelimit.config import DistributedRateLimitConfig, Limit, RateLimitConfig
from sqlproxy.ratelimit.hierarchy import Bucket, Hierarchy, Rejection
from sqlproxy.ratelimit.service import RateLimiter

__all__ = [
    "Bucket",
    "DistributedRateLimitConfig",
    "Hierarchy",
    "Limit",
    "RateLimitConfig",
    "RateLimiter",
    "Rejection",
]
