"""Garbage-collector settings for a process that serves statements (``sqlproxy serve`` and its
wire worker processes)."""

from __future__ import annotations

import gc

_GC_YOUNG = 20_000


def tune_gc() -> None:
    """Every statement allocates a few hundred short-lived objects, so the youngest generation
    fills every few statements; what startup built (configuration, catalog, caches) lives as
    long as the process. Those are moved out of the collector's sight, and the young
    generation may grow larger before it is collected: collections run less often and each
    walks fewer objects. Reference cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG, 20, 20)
