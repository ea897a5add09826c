from __future__ import annotations

import pytest

from sqlproxy.sql.analyzer import analyze
from sqlproxy.sql.cache import AnalysisCache
from sqlproxy.sql.catalog import Catalog
from sqlproxy.sql.model import SqlSyntaxError

from .sql_demo_catalog import SPEC, demo_catalog, t

CAT = demo_catalog()
PATH = ("public",)


def test_select_with_new_literals_hits_the_shape_entry() -> None:
    cache = AnalysisCache(16)
    first = cache.get_or_analyze("SELECT name FROM customers WHERE id = 1", CAT, PATH)
    second = cache.get_or_analyze("SELECT name FROM customers WHERE id = 2", CAT, PATH)
    assert (cache.hits, cache.misses) == (1, 1)
    assert second is first
    assert len(cache) == 1


def test_pgbench_style_update_hits() -> None:
    cache = AnalysisCache(16)
    for delta in (-5, 17, 4000):
        cache.get_or_analyze(f"UPDATE orders SET total = total + {delta} WHERE id = {delta * 3}", CAT, PATH)
    assert (cache.hits, cache.misses) == (2, 1)


def test_aliases_are_part_of_the_key() -> None:
    cache = AnalysisCache(16)
    a = cache.get_or_analyze("SELECT email AS a FROM customers", CAT, PATH)
    b = cache.get_or_analyze("SELECT email AS b FROM customers", CAT, PATH)
    assert cache.misses == 2
    assert [o.name for o in a.statements[0].outputs] == ["a"]
    assert [o.name for o in b.statements[0].outputs] == ["b"]


def test_set_statements_never_share_an_entry_across_literals() -> None:
    cache = AnalysisCache(16)
    a = cache.get_or_analyze("SET search_path = private; SELECT * FROM customers", CAT, PATH)
    b = cache.get_or_analyze("SET search_path = public; SELECT * FROM customers", CAT, PATH)
    assert cache.misses == 2
    assert a.final_search_path == ("private",)
    assert b.final_search_path == ("public",)
    assert b.statements[1].relations[0].table == t("public.customers")
    # The exact text is still cached.
    cache.get_or_analyze("SET search_path = private; SELECT * FROM customers", CAT, PATH)
    assert cache.hits == 1


def test_set_config_calls_never_share_an_entry_across_literals() -> None:
    """set_config('jit', ...) is a plain SET and set_config('role', ...) an identity change: the
    same shape, told apart by a literal, so neither may answer for the other."""
    cache = AnalysisCache(16)
    jit = cache.get_or_analyze("SELECT set_config('jit', 'off', false)", CAT, PATH)
    role = cache.get_or_analyze("SELECT set_config('role', 'admin', false)", CAT, PATH)
    assert cache.misses == 2
    assert (jit.statements[0].settings, jit.statements[0].functions) == (frozenset({"jit"}), frozenset())
    assert (role.statements[0].settings, role.statements[0].functions) == (
        frozenset(),
        frozenset({"set_config"}),
    )
    again = cache.get_or_analyze("SELECT set_config('role', 'admin', false)", CAT, PATH)
    assert again is role and cache.hits == 1


def test_copy_and_explain_are_keyed_by_exact_text() -> None:
    cache = AnalysisCache(16)
    a = cache.get_or_analyze("COPY orders TO STDOUT", CAT, PATH)
    b = cache.get_or_analyze("COPY orders TO '/tmp/x'", CAT, PATH)
    assert a.statements[0].dangers == frozenset()
    assert "copy_file" in b.statements[0].dangers
    c = cache.get_or_analyze("EXPLAIN (ANALYZE false) DELETE FROM orders", CAT, PATH)
    d = cache.get_or_analyze("EXPLAIN (ANALYZE true) DELETE FROM orders", CAT, PATH)
    assert (c.statements[0].executes_inner, d.statements[0].executes_inner) == (False, True)
    assert cache.hits == 0


def test_search_path_is_part_of_the_key() -> None:
    cache = AnalysisCache(16)
    a = cache.get_or_analyze("SELECT * FROM customers", CAT, ["public"])
    b = cache.get_or_analyze("SELECT * FROM customers", CAT, ["private"])
    assert a.relations[0].table == t("public.customers")
    assert b.relations[0].table == t("private.customers")


def test_new_catalog_snapshot_invalidates() -> None:
    cache = AnalysisCache(16)
    cache.get_or_analyze("SELECT * FROM customers", CAT, PATH)
    newer = Catalog.from_dict(SPEC)
    cache.get_or_analyze("SELECT * FROM customers", newer, PATH)
    assert (cache.hits, cache.misses) == (0, 2)


def test_cached_analysis_holds_no_literal_values() -> None:
    cache = AnalysisCache(16)
    secret = "hunter2-secret-literal"
    cache.get_or_analyze(f"SELECT name FROM customers WHERE email = '{secret}' LIMIT 99137", CAT, PATH)
    (cached,) = cache._entries.values()
    assert secret not in repr(cached)
    assert "99137" not in repr(cached)


def test_lru_is_bounded_and_evicts_least_recent() -> None:
    cache = AnalysisCache(2)
    cache.get_or_analyze("SELECT id FROM customers", CAT, PATH)
    cache.get_or_analyze("SELECT id FROM orders", CAT, PATH)
    cache.get_or_analyze("SELECT id FROM customers", CAT, PATH)  # refresh
    cache.get_or_analyze("SELECT id FROM employees", CAT, PATH)  # evicts orders
    assert len(cache) == 2
    cache.get_or_analyze("SELECT id FROM customers", CAT, PATH)
    assert cache.hits == 2
    cache.get_or_analyze("SELECT id FROM orders", CAT, PATH)
    assert cache.misses == 4


def test_syntax_error_propagates_and_is_not_cached() -> None:
    cache = AnalysisCache(4)
    with pytest.raises(SqlSyntaxError):
        cache.get_or_analyze("SELEC 1", CAT, PATH)
    assert len(cache) == 0


def test_cached_result_equals_fresh_analysis() -> None:
    cache = AnalysisCache(4)
    cache.get_or_analyze("SELECT c.email FROM customers c WHERE id = 5", CAT, PATH)
    hit = cache.get_or_analyze("SELECT c.email FROM customers c WHERE id = 6", CAT, PATH)
    fresh = analyze("SELECT c.email FROM customers c WHERE id = 6", CAT, PATH)
    assert hit.statements == fresh.statements
    assert hit.normalized == fresh.normalized
