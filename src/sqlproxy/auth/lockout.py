"""Lockout after repeated authentication failures.

Keys are opaque strings chosen by the caller ("user:alice", "ip:203.0.113.9"). Memory is
bounded: an attacker who sends failures from many sources can only push out the oldest records,
never grow the tables past ``max_entries`` each.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

Clock = Callable[[], float]


class Lockout:
    def __init__(
        self,
        threshold: int,
        window_s: float,
        duration_s: float,
        clock: Clock = time.monotonic,
        max_entries: int = 10_000,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if window_s <= 0 or duration_s <= 0:
            raise ValueError("window_s and duration_s must be positive")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.threshold = threshold
        self.window_s = window_s
        self.duration_s = duration_s
        self.max_entries = max_entries
        self._clock = clock
        # Only the last `threshold` failure times matter for "threshold failures within window".
        # Ordered by last failure, oldest first, so eviction drops the stalest record.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        # Ordered by lock time; with one fixed duration that is also expiry order, so the lock
        # evicted under pressure is always the one closest to expiring anyway.
        self._locked_until: OrderedDict[str, float] = OrderedDict()
        # The HTTP door may authenticate from a thread pool; the tables must not tear.
        self._mutex = threading.Lock()
        # Told of every lock this table decides (key, seconds): the wire door's worker
        # processes must lock the key too.
        self.on_lock: Callable[[str, float], None] | None = None

    def locked(self, key: str) -> bool:
        """Whether ``key`` is locked now."""
        now = self._clock()
        with self._mutex:
            until = self._locked_until.get(key)
            if until is None:
                return False
            if now >= until:
                del self._locked_until[key]
                return False
            return True

    def remaining(self, key: str) -> float:
        """Seconds until ``key`` is unlocked (0 when it is not locked)."""
        now = self._clock()
        with self._mutex:
            until = self._locked_until.get(key)
            return max(0.0, until - now) if until is not None else 0.0

    def record_failure(self, key: str) -> bool:
        """Count one failure for ``key``; return True when this failure locks it."""
        locked = self._record_failure(key)
        if locked and self.on_lock is not None:
            self.on_lock(key, self.duration_s)
        return locked

    def _record_failure(self, key: str) -> bool:
        now = self._clock()
        with self._mutex:
            times = self._failures.get(key)
            if times is None:
                times = deque(maxlen=self.threshold)
                self._failures[key] = times
            else:
                self._failures.move_to_end(key)
            times.append(now)
            self._evict(self._failures, now)
            if len(times) < self.threshold or now - times[0] > self.window_s:
                return False
            # Locked: the failure history has done its job; a fresh count starts after expiry.
            del self._failures[key]
            self._locked_until[key] = now + self.duration_s
            self._locked_until.move_to_end(key)
            self._evict_locks(now)
            return True

    def active_locks(self) -> list[tuple[str, float]]:
        """Every key locked now, with the seconds its lock has left."""
        now = self._clock()
        with self._mutex:
            return [(k, until - now) for k, until in self._locked_until.items() if until > now]

    def lock_for(self, key: str, seconds: float) -> None:
        """Lock ``key`` for ``seconds`` from now (a lock another process of the proxy decided);
        a longer running lock is kept."""
        now = self._clock()
        with self._mutex:
            until = now + seconds
            if self._locked_until.get(key, 0.0) >= until:
                return
            self._failures.pop(key, None)
            self._locked_until[key] = until
            self._locked_until.move_to_end(key)
            self._evict_locks(now)

    def reset(self, key: str) -> None:
        """Forget failures for ``key`` (after a success). A running lock is not lifted."""
        with self._mutex:
            self._failures.pop(key, None)

    def __len__(self) -> int:
        """How many keys hold state (failure history or a lock)."""
        with self._mutex:
            return len(self._failures.keys() | self._locked_until.keys())

    def _evict(self, table: OrderedDict[str, deque[float]], now: float) -> None:
        # Drop histories whose newest failure left the window (they can no longer lock anything),
        # oldest first, then the oldest live ones if the table is still over its bound.
        while table:
            key, times = next(iter(table.items()))
            if now - times[-1] > self.window_s or len(table) > self.max_entries:
                del table[key]
            else:
                break

    def _evict_locks(self, now: float) -> None:
        while self._locked_until:
            key, until = next(iter(self._locked_until.items()))
            if until <= now or len(self._locked_until) > self.max_entries:
                del self._locked_until[key]
            else:
                break
