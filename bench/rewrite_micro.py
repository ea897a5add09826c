"""Per-statement cost of the row filter / mask rewrite, in-process: the direct rewrite (parse,
rewrite, deparse) against the shape cache RewriteStage uses (normalize, look up, splice), for a
few statements with a new literal each time, under the demo analyst's directives on customers
(row filter and two masks). Best of --repeat runs, microseconds per statement.

    .venv/bin/python bench/rewrite_micro.py --statements 2000 --repeat 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from sqlproxy.config.models import MaskKind
from sqlproxy.sql.catalog import Catalog
from sqlproxy.sql.model import TableName
from sqlproxy.sql.rewrite import RelationRewrite, rewrite
from sqlproxy.sql.rewrite_cache import RewriteCache

CATALOG = Catalog.from_dict(
    {
        "public.customers": {"columns": ["id", "name", "email", "phone", "region"]},
        "public.orders": {"columns": ["id", "customer_id", "total", "created_at"]},
    }
)
DIRECTIVES = {
    TableName("public", "customers"): RelationRewrite(
        "region = 'EU'", {"email": MaskKind.PARTIAL, "phone": MaskKind.REDACT}
    )
}
SHAPES = {
    "point select": "SELECT id, name, email, region FROM customers WHERE id = {}",
    "join + IN list": "SELECT c.name, o.total FROM customers c JOIN orders o ON o.customer_id = c.id "
    "WHERE c.id IN ({}, {}, 3) AND o.total > {}.5 ORDER BY 1 LIMIT 10",
    "update": "UPDATE customers SET name = 'n{}' WHERE id = {} RETURNING email",
}


def per_statement(fn: Callable[[str], str], texts: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for text in texts:
            fn(text)
        best = min(best, (time.perf_counter() - t) / len(texts))
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--statements", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'statement':16} {'direct us':>10} {'cached us':>10} {'speed-up':>9}")
    for name, shape in SHAPES.items():
        texts = [shape.format(*([i] * shape.count("{}"))) for i in range(1, args.statements + 1)]
        cache = RewriteCache()

        def direct(text: str) -> str:
            return rewrite(text, DIRECTIVES, CATALOG, ["public"], "salt")

        def cached(text: str, cache: RewriteCache = cache) -> str:
            return cache.rewrite(text, DIRECTIVES, CATALOG, ["public"], "salt")

        for text in texts[:3]:
            assert cached(text) == direct(text)
        d = per_statement(direct, texts, args.repeat)
        c = per_statement(cached, texts, args.repeat)
        print(f"{name:16} {d:10.1f} {c:10.1f} {d / c:8.1f}x")


if __name__ == "__main__":
    main()
