"""The pipeline: a list of stages folded into one callable, the way Starlette builds its middleware
stack. Each stage gets the request and the rest of the chain, so an outer stage (audit, metrics)
sees every outcome of the inner ones, including errors."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from sqlproxy.pipeline.request import Request

Next = Callable[[Request], Awaitable[None]]


class Stage(Protocol):
    name: str

    async def __call__(self, req: Request, call_next: Next) -> None: ...


async def _end(req: Request) -> None:
    return None


class Pipeline:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)
        chain: Next = _end
        for stage in reversed(self.stages):
            chain = _bind(stage, chain)
        self._chain = chain

    async def run(self, req: Request) -> Request:
        """Run the request through every stage. Raises ProxyError when it did not succeed; the
        request carries the results otherwise."""
        await self._chain(req)
        return req


def _bind(stage: Stage, call_next: Next) -> Next:
    # A partial, not a wrapper coroutine: calling it returns the stage's own coroutine, so each
    # stage costs one coroutine frame per request instead of two.
    return functools.partial(stage.__call__, call_next=call_next)
