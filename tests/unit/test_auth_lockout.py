import pytest

from sqlproxy.auth.lockout import Lockout


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def test_locks_at_threshold_within_window() -> None:
    clock = FakeClock()
    lk = Lockout(threshold=3, window_s=60, duration_s=300, clock=clock)
    assert lk.record_failure("k") is False
    clock.advance(10)
    assert lk.record_failure("k") is False
    assert not lk.locked("k")
    clock.advance(10)
    assert lk.record_failure("k") is True
    assert lk.locked("k")
    assert lk.remaining("k") == 300
    assert not lk.locked("other")


def test_failures_spread_wider_than_window_do_not_lock() -> None:
    clock = FakeClock()
    lk = Lockout(threshold=3, window_s=60, duration_s=300, clock=clock)
    for _ in range(10):
        assert lk.record_failure("k") is False
        clock.advance(31)  # any 3 consecutive failures span 62 s
    assert not lk.locked("k")


def test_lock_expires_after_duration_and_counting_restarts() -> None:
    clock = FakeClock()
    lk = Lockout(threshold=2, window_s=60, duration_s=300, clock=clock)
    lk.record_failure("k")
    assert lk.record_failure("k")
    clock.advance(299.9)
    assert lk.locked("k")
    clock.advance(0.1)
    assert not lk.locked("k")
    assert lk.remaining("k") == 0
    # The failures that caused the lock are spent: one new failure is not enough to relock.
    assert lk.record_failure("k") is False
    assert not lk.locked("k")
    assert lk.record_failure("k") is True


def test_reset_forgets_failures_but_not_a_running_lock() -> None:
    clock = FakeClock()
    lk = Lockout(threshold=2, window_s=60, duration_s=300, clock=clock)
    lk.record_failure("a")
    lk.reset("a")
    assert lk.record_failure("a") is False
    lk.record_failure("b")
    lk.record_failure("b")
    lk.reset("b")
    assert lk.locked("b")


def test_memory_is_bounded_under_a_spray_of_sources() -> None:
    clock = FakeClock()
    lk = Lockout(threshold=3, window_s=60, duration_s=300, clock=clock, max_entries=100)
    for i in range(10_000):
        lk.record_failure(f"ip:{i}")
    assert len(lk) <= 100
    # The most recent sources are the ones kept.
    lk.record_failure("ip:9999")
    assert lk.record_failure("ip:9999") is True


def test_locks_are_bounded_too() -> None:
    clock = FakeClock()
    lk = Lockout(threshold=1, window_s=60, duration_s=300, clock=clock, max_entries=50)
    for i in range(1000):
        assert lk.record_failure(f"ip:{i}")
    assert len(lk) <= 50
    assert lk.locked("ip:999")


def test_stale_histories_are_dropped() -> None:
    clock = FakeClock()
    lk = Lockout(threshold=3, window_s=60, duration_s=300, clock=clock)
    for i in range(100):
        lk.record_failure(f"ip:{i}")
    clock.advance(61)
    lk.record_failure("fresh")
    assert len(lk) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0, "window_s": 1, "duration_s": 1},
        {"threshold": 1, "window_s": 0, "duration_s": 1},
        {"threshold": 1, "window_s": 1, "duration_s": -1},
        {"threshold": 1, "window_s": 1, "duration_s": 1, "max_entries": 0},
    ],
)
def test_rejects_nonsense_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Lockout(**kwargs)  # type: ignore[arg-type]


def test_on_lock_hears_of_every_lock_and_lock_for_applies_one_from_elsewhere() -> None:
    # Wire worker processes: the proxy's table tells them of its locks (on_lock), each applies
    # them (lock_for), and a worker started later gets the running ones (active_locks).
    clock = FakeClock()
    primary = Lockout(threshold=2, window_s=60, duration_s=300, clock=clock)
    heard: list[tuple[str, float]] = []
    primary.on_lock = lambda key, seconds: heard.append((key, seconds))
    assert primary.record_failure("k") is False and heard == []
    assert primary.record_failure("k") is True
    assert heard == [("k", 300)]
    worker = Lockout(threshold=2, window_s=60, duration_s=300, clock=clock)
    worker.record_failure("k")  # its own history goes: the lock stands for it
    worker.lock_for(*heard[0])
    assert worker.locked("k") and worker.remaining("k") == 300
    worker.lock_for("k", 10)  # a shorter lock never shortens a running one
    assert worker.remaining("k") == 300
    clock.advance(100)
    assert primary.active_locks() == [("k", 200)]
    late = Lockout(threshold=2, window_s=60, duration_s=300, clock=clock)
    for key, seconds in primary.active_locks():
        late.lock_for(key, seconds)
    assert late.remaining("k") == 200
    clock.advance(200)
    assert primary.active_locks() == [] and not worker.locked("k") and not late.locked("k")
