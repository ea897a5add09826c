"""The shape-cached rewrite must give what the direct rewrite gives, for every literal set."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from pglast import parse_sql

from sqlproxy.config.models import MaskKind
from sqlproxy.sql.rewrite import RelationRewrite, RewriteError, rewrite
from sqlproxy.sql.rewrite_cache import RewriteCache

from .sql_demo_catalog import demo_catalog, t

CAT = demo_catalog()
PATH = ("public",)
SALT = "pep$1per'--"
CUSTOMERS = t("public.customers")
ORDERS = t("public.orders")

DIRECTIVE_SETS: dict[str, dict[Any, RelationRewrite]] = {
    "filter": {CUSTOMERS: RelationRewrite("region = 'EU'")},
    "masks+filter": {
        CUSTOMERS: RelationRewrite(
            "region = 'EU' AND id > -1", {"email": MaskKind.PARTIAL, "phone": MaskKind.HASH}
        ),
        ORDERS: RelationRewrite("total < 1000.5", {"total": MaskKind.REDACT}),
    },
    "masks": {CUSTOMERS: RelationRewrite(None, {"email": MaskKind.NULL, "name": MaskKind.REDACT})},
    "unicode filter": {CUSTOMERS: RelationRewrite("region IN ('Ü', 'é') AND name <> E'\\n'")},
}

# Each {} is one constant of the statement; LITERALS are substituted there.
TEMPLATES = [
    "SELECT id, name, email, region FROM customers WHERE id = {}",
    "SELECT * FROM customers WHERE name = {} AND id IN ({}, {}, {}) LIMIT {} OFFSET {}",
    "SELECT c.name, o.total FROM customers c JOIN orders o ON o.customer_id = c.id "
    "WHERE o.total > {} AND c.email LIKE {} ORDER BY 1",
    "SELECT * FROM customers WHERE id = (SELECT max(customer_id) FROM orders WHERE total > {}) "
    "OR name IN (SELECT name FROM customers WHERE region = {})",
    "WITH recent AS (SELECT * FROM orders WHERE total >= {}) "
    "SELECT r.id, c.email FROM recent r JOIN customers c ON c.id = r.customer_id WHERE c.id <> {}",
    "WITH customers AS (SELECT * FROM customers WHERE id < {}) SELECT * FROM customers WHERE id > {}",
    "INSERT INTO orders (customer_id, total) SELECT id, {} FROM customers WHERE region = {}",
    "UPDATE customers SET name = {} WHERE id = {} RETURNING *",
    "UPDATE customers AS c SET region = {} WHERE c.email = {} AND c.id BETWEEN {} AND {}",
    "DELETE FROM customers WHERE email LIKE {} RETURNING email, {}",
    "SELECT count(*), {} FROM customers GROUP BY region HAVING count(*) > {}",
    "SELECT CASE WHEN id > {} THEN {} ELSE {} END FROM customers",
    "SELECT {}::text, CAST({} AS varchar(10)), {}::numeric(10, 2) FROM customers",
    "SELECT * FROM customers WHERE region = ANY (ARRAY[{}, {}]) AND id NOT IN ({})",
    "SELECT * FROM customers WHERE coalesce(email, {}) = {} FETCH FIRST {} ROWS ONLY",
    "SELECT * FROM (SELECT id, email FROM customers WHERE id > {}) AS s WHERE s.id < {}",
    "SELECT id FROM customers WHERE id > {} UNION ALL SELECT customer_id FROM orders WHERE total = {}",
    "SELECT * FROM customers, LATERAL (SELECT * FROM orders WHERE orders.customer_id = customers.id "
    "AND total > {}) o",
    "SELECT * FROM customer_emails WHERE contact <> {}",
    "SELECT * FROM employees WHERE salary > {}",
    "COPY (SELECT * FROM customers WHERE id = {}) TO STDOUT",
    "SELECT * FROM customers c WHERE c.id = $1 AND c.name = {}",
    "SELECT * FROM customers /* a 'comment' 5 */ WHERE id = {} -- trailing {}\n",
    'SELECT * FROM customers WHERE name = {} COLLATE "C" AND email IS NOT DISTINCT FROM {}',
    "SELECT * FROM customers WHERE row(id, name) = row({}, {})",
    "SELECT * FROM customers WHERE id = {} AND {} AND NOT {}",
    'SELECT name AS "naïve" /* é */, {} FROM customers WHERE name = {} AND email = {}',
    "SELECT * FROM customers WHERE id = {} OR id = {} OR name = {} OR name = {} OR id = {}",
    "SELECT * FROM customers WHERE name LIKE {} ESCAPE {} AND now() AT TIME ZONE {} > DATE {} - interval {}",
    "SELECT * FROM customers WHERE id IN (SELECT customer_id FROM orders "
    "WHERE total BETWEEN {} AND {} AND created_at > TIMESTAMP {})",
    "INSERT INTO customers (id, name) VALUES ({}, {}), ({}, {}) RETURNING email, {}",
    "SELECT * FROM customers TABLESAMPLE SYSTEM ({}) REPEATABLE ({}) WHERE id = {}",
    "SELECT {} + id, -{}, - {}, id - {}, id-{}, {}-id FROM customers",
    "SELECT substring(email FROM {} FOR {}), {} || name, position({} IN name) FROM customers",
    "SELECT * FROM customers WHERE id = {} FOR UPDATE",
    "EXPLAIN SELECT * FROM customers WHERE id = {}",
    "SELECT count(*) FILTER (WHERE id > {}) OVER (), ({}::int[])[1], (ARRAY[{}, {}])[1] FROM customers",
    "SELECT * FROM customers WHERE (id, name) IN (({}, {}), ({}, {})) AND email ~ {}",
    "SELECT * FROM customers WHERE id = {}; ",
]

LITERALS = [
    "0",
    "42",
    "2147483648",
    "99999999999999999999",
    "3.14",
    ".5",
    "1.",
    "1e10",
    "2.5E-3",
    "-7",
    "- 8",
    "-0.25",
    "'x'",
    "''",
    "'it''s'",
    "'$1'",
    "'-- not a comment'",
    "'héllo, wörld ✓'",
    "'a\\b'",
    "E'tab\\there'",
    "e'quote\\''",
    "$$dollar 'quoted' $1$$",
    "$tag$x $$ y$tag$",
    "B'1010'",
    "X'1F'",
    "TRUE",
    "false",
    "NULL",
]


def same(a: str, b: str) -> bool:
    return a == b or parse_sql(a) == parse_sql(b)


def direct_or_error(sql: str, directives: Any) -> str | type[Exception]:
    try:
        return rewrite(sql, directives, CAT, PATH, SALT)
    except Exception as e:
        return type(e)


def check(cache: RewriteCache, sql: str, directives: Any) -> None:
    expected = direct_or_error(sql, directives)
    if isinstance(expected, str):
        got = cache.rewrite(sql, directives, CAT, PATH, SALT)
        assert same(got, expected), (sql, got, expected)
    else:
        with pytest.raises(expected):
            cache.rewrite(sql, directives, CAT, PATH, SALT)


@pytest.mark.parametrize("directives", DIRECTIVE_SETS.values(), ids=list(DIRECTIVE_SETS))
@pytest.mark.parametrize("template", TEMPLATES)
def test_cached_rewrite_equals_direct_for_many_literal_sets(template: str, directives: Any) -> None:
    rnd = random.Random(template)
    cache = RewriteCache()
    n = template.count("{}")
    literal_sets = [["1"] * n, ["2"] * n, ["'a'"] * n]
    literal_sets += [[rnd.choice(LITERALS) for _ in range(n)] for _ in range(6)]
    for literals in literal_sets:
        check(cache, template.format(*literals), directives)
    if "--" not in template:  # a constant inside a comment is part of the shape
        assert cache.hits >= 2


@pytest.mark.parametrize("template", TEMPLATES[:12])
def test_every_literal_kind_through_one_entry(template: str) -> None:
    directives = DIRECTIVE_SETS["masks+filter"]
    cache = RewriteCache()
    n = template.count("{}")
    for lit in LITERALS:
        check(cache, template.format(*([lit] * n)), directives)


def test_plain_statements_take_the_fast_path() -> None:
    cache = RewriteCache()
    d = DIRECTIVE_SETS["masks+filter"]
    sql = "SELECT * FROM customers WHERE name = {} AND id IN ({}, {}) LIMIT {}"
    check(cache, sql.format("'a'", 1, 2, 3), d)  # miss: direct, entry built and checked
    assert (cache.misses, cache.hits) == (1, 0)
    for lits in (("'b''c'", 4, 5, 6), ("E'x\\'y'", "-1", "2.5", "NULL"), ("$$z$$", "TRUE", "1e3", 7)):
        check(cache, sql.format(*lits), d)
    assert cache.hits == 3 and cache.fallbacks == 0 and len(cache) == 1


def test_output_of_a_hit_is_the_direct_text_for_plain_literals() -> None:
    cache = RewriteCache()
    d = DIRECTIVE_SETS["masks+filter"]
    sql = "SELECT id, email FROM customers WHERE id = {} AND name = {}"
    cache.rewrite(sql.format(1, "'a'"), d, CAT, PATH, SALT)
    got = cache.rewrite(sql.format(2, "'b'"), d, CAT, PATH, SALT)
    assert cache.hits == 1
    assert got == rewrite(sql.format(2, "'b'"), d, CAT, PATH, SALT)


def test_unchanged_statements_come_back_as_they_are() -> None:
    cache = RewriteCache()
    d = DIRECTIVE_SETS["filter"]
    for i in range(3):
        sql = f"SELECT * FROM orders WHERE id = {i} -- keep me"
        assert cache.rewrite(sql, d, CAT, PATH, SALT) == sql
    assert cache.hits == 2  # the first builds the entry and checks it against the direct rewrite


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM customers WHERE name = N'abc'",  # normalised to N$1, an identifier
        "SELECT * FROM customers WHERE name = U&'d\\0061t'",
        "SELECT * FROM customers WHERE name = 'a'\n 'b'",  # continued string
        "SELECT * FROM customers WHERE id = 1_000",
        "SELECT * FROM customers WHERE id = 0x1F",
        "SELECT * FROM customers WHERE id = - -5",
        "SELECT * FROM customers LIMIT ALL",
        "SELECT * FROM customers WHERE name = 'a' -- comment\n",
    ],
)
def test_fallbacks_still_equal_the_direct_rewrite(sql: str) -> None:
    cache = RewriteCache()
    d = DIRECTIVE_SETS["masks+filter"]
    for _ in range(3):
        check(cache, sql, d)
    assert cache.hits == 0


def test_constants_glued_to_operators() -> None:
    cache = RewriteCache()
    d = DIRECTIVE_SETS["masks+filter"]
    for lits in (("-5", "'a'"), ("-6", "'b'"), ("7", "''"), ("- 8.5", "'c'")):
        check(cache, "SELECT * FROM customers WHERE id>={} AND name||{}<>'x'".format(*lits), d)
    assert cache.hits >= 2
    # "#-" is one operator and "--" starts a comment: the constant is 5, not -5.
    for sql in (
        "SELECT * FROM customers WHERE id #-5",
        "SELECT * FROM customers WHERE id < -5 AND name =--5\n'x'",
    ):
        for _ in range(3):
            check(cache, sql, d)


def test_typed_literals_and_limit() -> None:
    cache = RewriteCache()
    d = DIRECTIVE_SETS["masks+filter"]
    sql = "SELECT DATE {}, interval {} day, TIMESTAMP {}, {}::interval FROM customers LIMIT {}"
    for lits in (
        ("'2020-01-01'", "'1'", "'2020-01-01 10:00'", "'1 day'", 5),
        ("'1999-12-31'", "'7'", "'x'", "'2 h'", 9),
    ):
        check(cache, sql.format(*lits), d)


def test_own_parameters_numbered_differently_do_not_share_an_entry() -> None:
    # normalize() gives both statements the same shape text "... id = $1 AND name = $2".
    cache = RewriteCache()
    d = DIRECTIVE_SETS["masks+filter"]
    first = "SELECT * FROM customers WHERE id = $1 AND name = 'x'"
    second = "SELECT * FROM customers WHERE id = $1 AND name = $2"
    third = "SELECT * FROM customers WHERE id = 5 AND name = 'y'"
    for sql in (first, first, second, third, second, first, third):
        check(cache, sql, d)
    out = cache.rewrite(second, d, CAT, PATH, SALT)
    assert "$2" in out


def test_parameters_in_a_row_filter_are_never_confused_with_the_statements() -> None:
    cache = RewriteCache()
    d = {CUSTOMERS: RelationRewrite("id = $1")}
    for i in range(3):
        sql = f"SELECT * FROM customers WHERE name = '{i}'"
        out = cache.rewrite(sql, d, CAT, PATH, SALT)
        assert out == rewrite(sql, d, CAT, PATH, SALT)
        assert "id = $1" in out
    assert cache.hits == 0


def test_key_holds_directives_catalog_path_and_salt() -> None:
    cache = RewriteCache()
    d1 = DIRECTIVE_SETS["masks+filter"]
    d2 = DIRECTIVE_SETS["masks"]
    variants = [
        (d1, CAT, PATH, SALT),
        (d2, CAT, PATH, SALT),
        (d1, CAT, PATH, "other salt"),
        (d1, demo_catalog(), PATH, SALT),
        (d1, CAT, ("private", "public"), SALT),
    ]
    for i in (1, 2, 3):
        sql = f"SELECT email FROM customers WHERE id = {i}"
        for d, cat, path, salt in variants:
            assert cache.rewrite(sql, d, cat, path, salt) == rewrite(sql, d, cat, path, salt)
    assert len(cache) == len(variants)
    assert cache.hits == 2 * len(variants)


def test_refusals_are_raised_as_by_the_direct_rewrite() -> None:
    cache = RewriteCache()
    d = DIRECTIVE_SETS["masks+filter"]
    for i in range(3):
        with pytest.raises(RewriteError):
            cache.rewrite(
                f"MERGE INTO customers c USING orders o ON o.id = {i} WHEN MATCHED THEN DELETE",
                d,
                CAT,
                PATH,
                SALT,
            )


def test_a_shape_that_does_not_reproduce_the_direct_rewrite_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlproxy.sql import rewrite_cache

    cache = RewriteCache()
    d = DIRECTIVE_SETS["masks+filter"]
    real = rewrite

    def wrong_for_shapes(sql: str, *a: Any) -> str:
        out = real(sql, *a)
        return out.replace("'EU'", "'US'") if "$" in sql else out

    monkeypatch.setattr(rewrite_cache, "rewrite", wrong_for_shapes)
    for i in range(4):
        sql = f"SELECT * FROM customers WHERE id = {i}"
        assert cache.rewrite(sql, d, CAT, PATH, SALT) == real(sql, d, CAT, PATH, SALT)
    assert cache.hits == 0


def test_lru_bound() -> None:
    cache = RewriteCache(max_entries=3)
    d = DIRECTIVE_SETS["filter"]
    for cols in itertools.islice(itertools.permutations(["id", "name", "email"]), 5):
        cache.rewrite(f"SELECT {', '.join(cols)} FROM customers WHERE id = 1", d, CAT, PATH, SALT)
    assert len(cache) == 3
    small = RewriteCache(max_chars=2000)
    for i in range(20):
        small.rewrite(f"SELECT email, {i} FROM customers WHERE id = 1", d, CAT, PATH, SALT)
    assert 1 <= len(small) < 20 and small._chars <= 2000 + 1000
