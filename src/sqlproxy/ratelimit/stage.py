"""The pipeline stage: right after authentication, before any parsing or upstream work, so a
client over its budget costs the proxy as little as possible."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlproxy.pipeline.pipeline import Next
from sqlproxy.pipeline.request import Request

if TYPE_CHECKING:
    from sqlproxy.runtime import Runtime


class RateLimitStage:
    name = "ratelimit"

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, req: Request, call_next: Next) -> None:
        rl = self.rt.rate_limiter
        if rl.active:
            t = time.perf_counter()
            ident = req.identity
            assert ident is not None
            # The database is resolved here the way the analyze stage will resolve it; an unknown
            # name is still limited globally and per user, and refused later.
            db = self.rt.config.current.resolve_database(req.database)
            try:
                # The local check needs no await; only a refusal may ask the cluster.
                pending = rl.admit(ident.name, ident.roles, db)
                if pending is not None:
                    await pending
            finally:
                req.stage_seconds[self.name] = time.perf_counter() - t
        await call_next(req)
