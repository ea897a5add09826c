"""The distributed limiter with several proxy nodes as separate processes on one real Redis
(``sqlproxy.ratelimit.loadnode``). Convergence is awaited by bounded polling on what the nodes
report; nothing here asserts on how long anything takes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sqlproxy.embedded.redis import EmbeddedRedis

Report = dict[str, Any]


class Node:
    def __init__(self, redis_url: str, node_id: str, prefix: str, *args: str) -> None:
        self.node_id = node_id
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "sqlproxy.ratelimit.loadnode",
                "--redis", redis_url, "--node-id", node_id, "--prefix", prefix, "--report", "0.05",
                *args,
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.reports: list[Report] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.reports.append(json.loads(line))

    @property
    def last(self) -> Report:
        with self._lock:
            return self.reports[-1] if self.reports else {}

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def quit(self) -> Report:
        self.send("quit")
        self.proc.wait(timeout=30)
        return self.last

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def wait_done(self) -> Report:
        self.proc.wait(timeout=120)
        time.sleep(0)  # let the reader thread see EOF
        deadline = time.monotonic() + 10
        while not self.last.get("final") and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.last


def wait_until(what: str, pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.02)


@pytest.fixture
def cluster(fresh_redis: EmbeddedRedis) -> Iterator[Callable[..., Node]]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    nodes: list[Node] = []

    def start(node_id: str, *args: str) -> Node:
        n = Node(fresh_redis.url, node_id, prefix, *args)
        nodes.append(n)
        return n

    yield start
    for n in nodes:
        if n.proc.poll() is None:
            n.kill()


def _timed(rate: float, burst: float, offered: float, duration: float, start_at: float) -> list[str]:
    return [
        "--rate", str(rate), "--burst", str(burst), "--offered", str(offered), "--sync", "0.3",
        "--expect-nodes", "3", "--start-at", str(start_at), "--duration", str(duration),
    ]  # fmt: skip


@pytest.mark.parametrize("offered", [(400, 400, 400), (900, 30, 30)], ids=["even", "skewed"])
def test_three_nodes_admit_the_global_limit(
    cluster: Callable[..., Node], offered: tuple[int, int, int]
) -> None:
    rate, burst, duration = 600.0, 60.0, 5.0
    start_at = time.time() + 3.0
    nodes = [cluster(f"n{i}", *_timed(rate, burst, o, duration, start_at)) for i, o in enumerate(offered)]
    finals = [n.wait_done() for n in nodes]
    admitted = sum(f["admitted"] for f in finals)
    ceiling = rate * duration + burst
    # Never more than the cluster limit (tokens are only moved between nodes, never made)...
    assert admitted <= ceiling * 1.03, finals
    # ...and close to it even when one node gets almost all the traffic: a static 1/3 split would
    # admit 200 + 30 + 30 per second, 43% of the limit, in the skewed case.
    assert admitted >= 0.85 * rate * duration, finals
    if offered[0] > offered[1]:
        assert finals[0]["share"] > 0.7
        assert finals[0]["borrowed"] > 0


def test_shares_follow_demand_and_nodes_joining_and_leaving(cluster: Callable[..., Node]) -> None:
    common = ["--rate", "600", "--burst", "60", "--sync", "0.2", "--ttl", "1.0"]
    a = cluster("a", *common, "--offered", "500")
    b = cluster("b", *common, "--offered", "500")

    def sees(n: Node, nodes: int, share: float, tol: float = 0.08) -> bool:
        r = n.last
        return r.get("nodes") == nodes and r.get("share") is not None and abs(r["share"] - share) <= tol

    wait_until("two nodes, half each", lambda: sees(a, 2, 0.5) and sees(b, 2, 0.5))
    c = cluster("c", *common, "--offered", "500")
    wait_until("three nodes, a third each", lambda: all(sees(n, 3, 1 / 3) for n in (a, b, c)))
    # Demand moves to a: its share follows (b and c keep what their small demand needs).
    b.send("offered 20")
    c.send("offered 20")
    # Each node reports its own share on its own schedule: wait for all three reports.
    wait_until(
        "a holds most of the budget, b and c little",
        lambda: (
            (a.last.get("share") or 0) > 0.8
            and (b.last.get("share") or 1) < 0.15
            and (c.last.get("share") or 1) < 0.15
        ),
    )
    b.send("offered 500")
    c.send("offered 500")
    wait_until("even again", lambda: all(sees(n, 3, 1 / 3) for n in (a, b, c)))
    # A clean leave hands the share back at once...
    c.quit()
    wait_until("c left", lambda: sees(a, 2, 0.5) and sees(b, 2, 0.5))
    # ...a crash after the heartbeat TTL.
    b.kill()
    wait_until("b expired", lambda: sees(a, 1, 1.0, tol=0.01))


def test_redis_stopped_and_restarted_mid_test(
    cluster: Callable[..., Node], fresh_redis: EmbeddedRedis
) -> None:
    common = ["--rate", "300", "--burst", "30", "--sync", "0.2", "--ttl", "1.0", "--expect-nodes", "3"]
    nodes = [cluster(f"n{i}", *common, "--offered", "200") for i in range(3)]
    wait_until("all connected", lambda: all(n.last.get("nodes") == 3 for n in nodes))
    fresh_redis.stop()
    # Neither fail-open nor fail-closed: each node keeps a static third of the limit.
    wait_until(
        "all degraded to 1/3",
        lambda: all(n.last.get("degraded") and abs((n.last.get("share") or 0) - 1 / 3) < 1e-3 for n in nodes),
    )
    before = [n.last for n in nodes]
    wait_until(
        "admitting while Redis is down",
        lambda: all(n.last["admitted"] >= b["admitted"] + 50 for n, b in zip(nodes, before, strict=True)),
    )
    during = [n.last for n in nodes]
    for b, d in zip(before, during, strict=True):
        # Still limited: offered grew by more than what was admitted.
        assert d["offered"] - b["offered"] > d["admitted"] - b["admitted"]
        assert d["degraded"]
    fresh_redis.restart()
    wait_until(
        "recovered by itself",
        lambda: all(not n.last.get("degraded") and n.last.get("nodes") == 3 for n in nodes),
    )
    for n in nodes:
        n.quit()
