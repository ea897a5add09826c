"""The policy engine on hand-built analyses: one table row per semantic rule of the module doc."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pytest
from pglast import ast
from pglast import parser as pg_parser

from sqlproxy.config.models import MaskKind, PolicyRule, RowFilter
from sqlproxy.policy.engine import DEFAULT_DENY, Decision, PolicyEngine, rewrite_directives
from sqlproxy.policy.principal import Principal
from sqlproxy.sql.model import (
    Access,
    Analysis,
    ColumnSource,
    CopyInfo,
    RelationAccess,
    StatementAnalysis,
    StatementKind,
    TableName,
)

K = StatementKind
A = Access

ALICE = Principal("alice", frozenset({"analyst"}), MappingProxyType({"region": "eu", "level": 3}))
BOB = Principal("bob", frozenset({"dev"}))
CAROL = Principal("carol", frozenset())

ORDERS = TableName("public", "orders")
CUSTOMERS = TableName("public", "customers")


def rule(name: str, action: str = "allow", **kw: Any) -> PolicyRule:
    return PolicyRule.model_validate({"name": name, "action": action, **kw})


def rfilter(name: str, predicate: str, table: str = "orders", **kw: Any) -> RowFilter:
    return RowFilter.model_validate({"name": name, "table": table, "predicate": predicate, **kw})


def rel(table: TableName, access: Access = A.READ, *cols: str) -> RelationAccess:
    return RelationAccess(table, access, frozenset(cols))


def stmt(
    kind: StatementKind,
    *relations: RelationAccess,
    functions: tuple[str, ...] = (),
    dangers: tuple[str, ...] = (),
    index: int = 0,
) -> StatementAnalysis:
    return StatementAnalysis(
        index=index,
        kind=kind,
        relations=relations,
        functions=frozenset(functions),
        dangers=frozenset(dangers),
    )


def an(*statements: StatementAnalysis) -> Analysis:
    return Analysis(
        statements=tuple(
            StatementAnalysis(
                index=i,
                kind=s.kind,
                relations=s.relations,
                functions=s.functions,
                dangers=s.dangers,
            )
            for i, s in enumerate(statements)
        ),
        fingerprint="x",
        normalized="x",
    )


def select(*relations: RelationAccess, **kw: Any) -> Analysis:
    return an(stmt(K.SELECT, *relations, **kw))


@dataclass
class Case:
    id: str
    rules: list[PolicyRule]
    analysis: Analysis
    allowed: bool
    rule: str
    principal: Principal = ALICE
    database: str = "prod"


ALLOW_ORDERS = rule("orders-read", roles=["analyst"], schema="public", table="orders", access=["read"])
SELECT_GATE = rule("select-gate", users=["*"], statements=["select"])
ADMIN_ALL = rule("all", users=["*"], database="prod")

CASES: list[Case] = [
    # -- who ------------------------------------------------------------------------------------
    Case("no rules: default deny", [], select(rel(ORDERS)), False, DEFAULT_DENY),
    Case("named user", [rule("u", users=["alice"], table="orders")], select(rel(ORDERS)), True, "u"),
    Case("role", [ALLOW_ORDERS], select(rel(ORDERS)), True, "orders-read"),
    Case("users *", [rule("star", users=["*"], table="orders")], select(rel(ORDERS)), True, "star"),
    Case("roles * with a role", [rule("rs", roles=["*"], table="orders")], select(rel(ORDERS)), True, "rs"),
    Case(
        "roles * without a role",
        [rule("rs", roles=["*"], table="orders")],
        select(rel(ORDERS)),
        False,
        DEFAULT_DENY,
        principal=CAROL,
    ),
    Case(
        "another user's rule does not apply",
        [rule("b", users=["bob"], table="orders"), rule("d", roles=["dev"], table="orders")],
        select(rel(ORDERS)),
        False,
        DEFAULT_DENY,
    ),
    # -- specificity by scope -------------------------------------------------------------------
    Case(
        "table block beats schema allow",
        [
            rule("s", roles=["analyst"], schema="public"),
            rule("t", "block", roles=["analyst"], table="orders"),
        ],
        select(rel(ORDERS)),
        False,
        "t",
    ),
    Case(
        "table allow beats schema block",
        [
            rule("s", "block", roles=["analyst"], schema="public"),
            rule("t", roles=["analyst"], table="orders"),
        ],
        select(rel(ORDERS)),
        True,
        "t",
    ),
    Case(
        "schema block beats database allow",
        [
            rule("db", roles=["analyst"], database="prod"),
            rule("s", "block", roles=["analyst"], schema="public"),
        ],
        select(rel(ORDERS)),
        False,
        "s",
    ),
    Case(
        "exact database beats database *",
        [rule("any", "block", roles=["analyst"]), rule("prod", roles=["analyst"], database="prod")],
        select(rel(ORDERS)),
        True,
        "prod",
    ),
    Case(
        "database scope that does not match",
        [rule("staging", roles=["analyst"], database="staging")],
        select(rel(ORDERS)),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "database glob",
        [rule("p", roles=["analyst"], database="pr*")],
        select(rel(ORDERS)),
        True,
        "p",
    ),
    Case(
        "exact table beats table glob (allow wins)",
        [rule("g", "block", roles=["analyst"], table="order*"), rule("e", roles=["analyst"], table="orders")],
        select(rel(ORDERS)),
        True,
        "e",
    ),
    Case(
        "exact table beats table glob (block wins)",
        [rule("g", roles=["analyst"], table="order*"), rule("e", "block", roles=["analyst"], table="orders")],
        select(rel(ORDERS)),
        False,
        "e",
    ),
    Case(
        "table glob beats table *",
        [
            rule("s", roles=["analyst"], schema="public"),
            rule("g", "block", roles=["analyst"], table="ord?rs"),
        ],
        select(rel(ORDERS)),
        False,
        "g",
    ),
    Case(
        "glob that does not match",
        [rule("g", roles=["analyst"], table="cust*")],
        select(rel(ORDERS)),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "names are case-sensitive",
        [rule("g", roles=["analyst"], table="Orders")],
        select(rel(ORDERS)),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "scope beats principal: role table rule beats user schema rule",
        [
            rule("user-schema", users=["alice"], schema="public"),
            rule("role-t", "block", roles=["analyst"], table="orders"),
        ],
        select(rel(ORDERS)),
        False,
        "role-t",
    ),
    # -- specificity by principal ---------------------------------------------------------------
    Case(
        "user beats role",
        [
            rule("role", "block", roles=["analyst"], table="orders"),
            rule("user", users=["alice"], table="orders"),
        ],
        select(rel(ORDERS)),
        True,
        "user",
    ),
    Case(
        "user block beats role allow",
        [
            rule("role", roles=["analyst"], table="orders"),
            rule("user", "block", users=["alice"], table="orders"),
        ],
        select(rel(ORDERS)),
        False,
        "user",
    ),
    Case(
        "role beats *",
        [rule("star", users=["*"], table="orders"), rule("role", "block", roles=["analyst"], table="orders")],
        select(rel(ORDERS)),
        False,
        "role",
    ),
    Case(
        "role allow beats * block",
        [rule("star", "block", users=["*"], table="orders"), rule("role", roles=["analyst"], table="orders")],
        select(rel(ORDERS)),
        True,
        "role",
    ),
    # -- ties -----------------------------------------------------------------------------------
    Case(
        "equal specificity: block beats allow (block first)",
        [rule("b", "block", roles=["analyst"], table="orders"), rule("a", roles=["analyst"], table="orders")],
        select(rel(ORDERS)),
        False,
        "b",
    ),
    Case(
        "equal specificity: block beats allow (allow first)",
        [
            rule("a", roles=["analyst"], table="orders"),
            rule("b", "block", users=["*"], roles=["analyst"], table="orders"),
        ],
        select(rel(ORDERS)),
        False,
        "b",
    ),
    # -- access modes and statement kinds -------------------------------------------------------
    Case(
        "access not granted",
        [ALLOW_ORDERS],
        an(stmt(K.INSERT, rel(ORDERS, A.INSERT, "id"))),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "statement kind not listed",
        [rule("sel", roles=["analyst"], table="orders", statements=["select"])],
        an(stmt(K.UPDATE, rel(ORDERS, A.UPDATE, "total"))),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "category dml",
        [rule("dml", roles=["analyst"], table="orders", statements=["dml"])],
        an(stmt(K.DELETE, rel(ORDERS, A.DELETE))),
        True,
        "dml",
    ),
    Case(
        "EXPLAIN needs explain, not select",
        [rule("sel", roles=["analyst"], table="orders", statements=["select"])],
        an(stmt(K.EXPLAIN, rel(ORDERS))),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "INSERT ON CONFLICT DO UPDATE under an insert rule",
        [rule("ins", roles=["analyst"], table="orders", statements=["insert"], access=["insert", "update"])],
        an(stmt(K.INSERT, rel(ORDERS, A.INSERT, "id", "total"), rel(ORDERS, A.UPDATE, "total"))),
        True,
        "ins",
    ),
    # -- data-modifying CTE: a SELECT that deletes needs delete permission -----------------------
    Case(
        "CTE delete with read-only permission",
        [ALLOW_ORDERS],
        select(rel(ORDERS, A.READ, "id"), rel(ORDERS, A.DELETE)),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "CTE delete under a select-only rule with access *",
        [rule("sel", roles=["analyst"], table="orders", statements=["select"])],
        select(rel(ORDERS, A.READ, "id"), rel(ORDERS, A.DELETE)),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "CTE delete with a delete rule",
        [
            ALLOW_ORDERS,
            rule("del", roles=["analyst"], table="orders", access=["delete"], statements=["delete"]),
        ],
        select(rel(ORDERS, A.READ, "id"), rel(ORDERS, A.DELETE)),
        True,
        "orders-read, del",
    ),
    Case(
        "CTE delete blocked by a table block on delete",
        [
            rule("all", roles=["analyst"], schema="public"),
            rule("nodel", "block", roles=["analyst"], table="orders", access=["delete"]),
        ],
        select(rel(ORDERS, A.READ, "id"), rel(ORDERS, A.DELETE)),
        False,
        "nodel",
    ),
    # -- all or nothing -------------------------------------------------------------------------
    Case(
        "second statement denied: whole request denied",
        [ALLOW_ORDERS],
        an(stmt(K.SELECT, rel(ORDERS)), stmt(K.DELETE, rel(ORDERS, A.DELETE))),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "second relation denied: whole request denied",
        [ALLOW_ORDERS],
        select(rel(ORDERS, A.READ, "id"), rel(CUSTOMERS, A.READ, "id")),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "every statement allowed: rules used listed",
        [ALLOW_ORDERS, rule("c", roles=["analyst"], table="customers")],
        an(stmt(K.SELECT, rel(ORDERS)), stmt(K.SELECT, rel(CUSTOMERS, A.READ, "id"))),
        True,
        "orders-read, c",
    ),
    # -- columns --------------------------------------------------------------------------------
    Case(
        "column block denies SELECT *",
        [ALLOW_ORDERS, rule("no-card", "block", roles=["analyst"], table="orders", columns=["card"])],
        select(rel(ORDERS, A.READ, "id", "total", "card")),
        False,
        "no-card",
    ),
    Case(
        "column block does not touch other columns",
        [ALLOW_ORDERS, rule("no-card", "block", roles=["analyst"], table="orders", columns=["card"])],
        select(rel(ORDERS, A.READ, "id", "total")),
        True,
        "orders-read",
    ),
    Case(
        "column glob block",
        [ALLOW_ORDERS, rule("no-secret", "block", roles=["analyst"], table="orders", columns=["secret_*"])],
        select(rel(ORDERS, A.READ, "id", "secret_note")),
        False,
        "no-secret",
    ),
    Case(
        "column allow beats table block for that column",
        [
            rule("t-block", "block", roles=["analyst"], table="orders"),
            rule("id-ok", roles=["analyst"], table="orders", columns=["id"]),
        ],
        select(rel(ORDERS, A.READ, "id")),
        True,
        "id-ok",
    ),
    Case(
        "other columns still follow the table block",
        [
            rule("t-block", "block", roles=["analyst"], table="orders"),
            rule("id-ok", roles=["analyst"], table="orders", columns=["id"]),
        ],
        select(rel(ORDERS, A.READ, "id", "total")),
        False,
        "t-block",
    ),
    Case(
        "no columns touched: table rules only",
        [
            rule("t-block", "block", roles=["analyst"], table="orders"),
            rule("id-ok", roles=["analyst"], table="orders", columns=["id"]),
        ],
        select(rel(ORDERS)),
        False,
        "t-block",
    ),
    Case(
        "column block of another principal does not apply",
        [ALLOW_ORDERS, rule("no-card", "block", roles=["dev"], table="orders", columns=["card"])],
        select(rel(ORDERS, A.READ, "card")),
        True,
        "orders-read",
    ),
    Case(
        "column rule beats a more specific principal at table level",
        [
            rule("user-t", users=["alice"], table="orders"),
            rule("star-col", "block", users=["*"], table="orders", columns=["card"]),
        ],
        select(rel(ORDERS, A.READ, "card")),
        False,
        "star-col",
    ),
    Case(
        "mask and block on a column at equal specificity: block",
        [
            ALLOW_ORDERS,
            rule("m", "mask", roles=["analyst"], table="orders", columns=["card"], mask="redact"),
            rule("b", "block", roles=["analyst"], table="orders", columns=["card"]),
        ],
        select(rel(ORDERS, A.READ, "card")),
        False,
        "b",
    ),
    Case(
        "masked column is not writable by the mask rule",
        [
            rule("m", "mask", roles=["analyst"], table="orders", columns=["card"], mask="redact"),
            ALLOW_ORDERS,
        ],
        an(stmt(K.UPDATE, rel(ORDERS, A.UPDATE, "card"))),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "masked column is writable when the table allows the write",
        [
            rule("m", "mask", roles=["analyst"], table="orders", columns=["card"], mask="redact"),
            rule("upd", roles=["analyst"], table="orders", access=["update"]),
        ],
        an(stmt(K.UPDATE, rel(ORDERS, A.UPDATE, "card"))),
        True,
        "upd",
    ),
    # -- statements without relations -----------------------------------------------------------
    Case("SELECT 1 without a rule", [ALLOW_ORDERS], select(), False, DEFAULT_DENY),
    Case("SELECT 1 with a select gate", [SELECT_GATE], select(), True, "select-gate"),
    Case(
        "SELECT now() with a read gate",
        [rule("r", users=["*"], statements=["read"])],
        select(functions=("now",)),
        True,
        "r",
    ),
    Case("a gate grants no table", [SELECT_GATE], select(rel(ORDERS)), False, DEFAULT_DENY),
    Case("SET needs its kind", [SELECT_GATE], an(stmt(K.SET)), False, DEFAULT_DENY),
    Case(
        "transaction control with one rule",
        [rule("tx", users=["*"], statements=["transaction"])],
        an(stmt(K.TRANSACTION)),
        True,
        "tx",
    ),
    Case(
        "utility category",
        [rule("util", users=["*"], statements=["utility"])],
        an(stmt(K.SHOW), stmt(K.LISTEN), stmt(K.TRANSACTION)),
        True,
        "util",
    ),
    Case("database-level relation rule allows SET", [ADMIN_ALL], an(stmt(K.SET)), True, "all"),
    Case("database-level relation rule allows tables", [ADMIN_ALL], select(rel(ORDERS)), True, "all"),
    Case(
        "database-level read rule allows SELECT 1",
        [rule("reader", users=["*"], access=["read"])],
        select(),
        True,
        "reader",
    ),
    Case(
        "database-level read rule does not allow SET",
        [rule("reader", users=["*"], access=["read"])],
        an(stmt(K.SET)),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "database-level read rule does not allow CREATE ROLE",
        [rule("reader", users=["*"], access=["read"])],
        an(stmt(K.GRANT)),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "gate block beats table allow",
        [
            rule("ddl-ok", roles=["analyst"], table="orders"),
            rule("no-ddl", "block", users=["*"], statements=["ddl"]),
        ],
        an(stmt(K.DDL, rel(ORDERS, A.DDL))),
        False,
        "no-ddl",
    ),
    Case(
        "more specific gate lifts a gate block",
        [
            rule("ddl-ok", roles=["analyst"], table="orders"),
            rule("no-ddl", "block", users=["*"], statements=["ddl"]),
            rule("alice-ddl", users=["alice"], database="prod", statements=["ddl"]),
        ],
        an(stmt(K.DDL, rel(ORDERS, A.DDL))),
        True,
        "ddl-ok",
    ),
    Case("unknown statement kind not matched by *", [ADMIN_ALL], an(stmt(K.OTHER)), False, DEFAULT_DENY),
    Case(
        "unknown statement kind named",
        [rule("other", users=["*"], statements=["other"])],
        an(stmt(K.OTHER)),
        True,
        "other",
    ),
    # -- dangerous statements -------------------------------------------------------------------
    Case("DO not matched by *", [ADMIN_ALL], an(stmt(K.DO, dangers=("do",))), False, DEFAULT_DENY),
    Case(
        "DO named",
        [rule("do", users=["alice"], statements=["do"])],
        an(stmt(K.DO, dangers=("do",))),
        True,
        "do",
    ),
    Case(
        "DO blocked by a more specific rule",
        [
            rule("do", users=["*"], statements=["do"]),
            rule("no-do", "block", roles=["analyst"], statements=["do"]),
        ],
        an(stmt(K.DO, dangers=("do",))),
        False,
        "no-do",
    ),
    Case(
        "COPY TO PROGRAM without the marker",
        [ADMIN_ALL],
        an(stmt(K.COPY, rel(ORDERS), dangers=("copy_program",))),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "COPY TO PROGRAM with the marker",
        [ADMIN_ALL, rule("prog", users=["alice"], statements=["copy_program"])],
        an(stmt(K.COPY, rel(ORDERS), dangers=("copy_program",))),
        True,
        "prog, all",
    ),
    Case(
        "marker named but the table is not readable",
        [rule("prog", users=["alice"], statements=["copy_program"])],
        an(stmt(K.COPY, rel(ORDERS), dangers=("copy_program",))),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "unknown marker is dangerous",
        [ADMIN_ALL, rule("util", users=["*"], statements=["utility", "ddl", "read", "dml"])],
        select(dangers=("brand_new_danger",)),
        False,
        DEFAULT_DENY,
    ),
    # -- dangerous functions --------------------------------------------------------------------
    Case("pg_read_file unqualified", [SELECT_GATE], select(functions=("pg_read_file",)), False, DEFAULT_DENY),
    Case(
        "pg_read_file qualified, mixed case",
        [SELECT_GATE],
        select(functions=("PG_Catalog.PG_Read_File",)),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "pg_sleep with a function rule of * only",
        [SELECT_GATE, rule("anyfn", users=["*"], functions=["*"])],
        select(functions=("pg_sleep",)),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "dangerous function in a table query",
        [ADMIN_ALL],
        select(rel(ORDERS), functions=("lo_import",)),
        False,
        DEFAULT_DENY,
    ),
    Case("dblink", [ADMIN_ALL], select(functions=("dblink_exec",)), False, DEFAULT_DENY),
    Case("query_to_xml", [ADMIN_ALL], select(functions=("query_to_xml",)), False, DEFAULT_DENY),
    Case("set_config", [ADMIN_ALL], select(functions=("pg_catalog.set_config",)), False, DEFAULT_DENY),
    Case(
        "user function of the same name",
        [SELECT_GATE],
        select(functions=("myschema.pg_read_file",)),
        True,
        "select-gate",
    ),
    Case("ordinary function", [SELECT_GATE], select(functions=("now", "lower")), True, "select-gate"),
    Case(
        "dangerous function named",
        [SELECT_GATE, rule("rf", users=["alice"], functions=["pg_read_file"])],
        select(functions=("pg_catalog.pg_read_file",)),
        True,
        "select-gate, rf",
    ),
    Case(
        "dangerous function by glob",
        [SELECT_GATE, rule("ls", users=["alice"], functions=["pg_ls_*"])],
        select(functions=("pg_ls_dir",)),
        True,
        "select-gate, ls",
    ),
    Case(
        "rule pattern qualified with pg_catalog",
        [SELECT_GATE, rule("rf", users=["alice"], functions=["PG_CATALOG.pg_read_file"])],
        select(functions=("pg_read_file",)),
        True,
        "select-gate, rf",
    ),
    Case(
        "dangerous function of another database",
        [SELECT_GATE, rule("rf", users=["alice"], database="staging", functions=["pg_read_file"])],
        select(functions=("pg_read_file",)),
        False,
        DEFAULT_DENY,
    ),
    Case(
        "dangerous function: user allow beats role block",
        [
            SELECT_GATE,
            rule("role-no", "block", roles=["analyst"], functions=["pg_sleep"]),
            rule("user-yes", users=["alice"], functions=["pg_sleep"]),
        ],
        select(functions=("pg_sleep",)),
        True,
        "select-gate, user-yes",
    ),
    Case(
        "dangerous function: exact block beats glob allow",
        [
            SELECT_GATE,
            rule("glob-yes", users=["alice"], functions=["pg_*"]),
            rule("exact-no", "block", users=["alice"], functions=["pg_sleep"]),
        ],
        select(functions=("pg_sleep",)),
        False,
        "exact-no",
    ),
    Case(
        "block an ordinary function unqualified",
        [SELECT_GATE, rule("no-secret", "block", users=["*"], functions=["secret_fn"])],
        select(functions=("secret_fn",)),
        False,
        "no-secret",
    ),
    Case(
        "block an ordinary function in any schema",
        [SELECT_GATE, rule("no-secret", "block", users=["*"], functions=["secret_fn"])],
        select(functions=("public.secret_fn",)),
        False,
        "no-secret",
    ),
    Case(
        "function rules grant no tables",
        [rule("fn", users=["*"], functions=["pg_sleep"])],
        select(rel(ORDERS)),
        False,
        DEFAULT_DENY,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decision(case: Case) -> None:
    d = PolicyEngine(case.rules, []).decide(case.principal, case.database, case.analysis)
    assert (d.allowed, d.rule) == (case.allowed, case.rule), d.reason
    if d.allowed:
        assert d.rule == ", ".join(d.rules_used)
    else:
        assert d.rules_used == ()


def test_column_block_reason_names_the_column_and_select_star() -> None:
    rules = [ALLOW_ORDERS, rule("no-card", "block", roles=["analyst"], table="orders", columns=["card"])]
    d = PolicyEngine(rules, []).decide(ALICE, "prod", select(rel(ORDERS, A.READ, "id", "card")))
    assert not d.allowed
    assert "public.orders.card" in d.reason
    assert "SELECT *" in d.reason


def test_deny_reasons_name_what_was_denied() -> None:
    e = PolicyEngine([SELECT_GATE], [])
    assert "delete on public.orders" in e.decide(ALICE, "prod", select(rel(ORDERS, A.DELETE))).reason
    assert "pg_read_file" in e.decide(ALICE, "prod", select(functions=("pg_read_file",))).reason
    assert "copy_program" in e.decide(ALICE, "prod", select(dangers=("copy_program",))).reason
    assert "set" in e.decide(ALICE, "prod", an(stmt(K.SET))).reason


def test_masks_recorded_for_reads() -> None:
    rules = [
        ALLOW_ORDERS,
        rule("mask-card", "mask", roles=["analyst"], table="orders", columns=["card"], mask="partial"),
        rule("mask-mail", "mask", roles=["analyst"], table="orders", columns=["e*"], mask="hash"),
    ]
    d = PolicyEngine(rules, []).decide(ALICE, "prod", select(rel(ORDERS, A.READ, "id", "card", "email")))
    assert d.allowed
    assert dict(d.masks) == {
        ColumnSource(ORDERS, "card"): MaskKind.PARTIAL,
        ColumnSource(ORDERS, "email"): MaskKind.HASH,
    }
    assert set(d.rules_used) == {"orders-read", "mask-card", "mask-mail"}


def test_mask_beats_table_block_for_its_column_only() -> None:
    rules = [
        rule("t-block", "block", roles=["analyst"], table="orders"),
        rule("mask-card", "mask", roles=["analyst"], table="orders", columns=["card"], mask="redact"),
    ]
    e = PolicyEngine(rules, [])
    d = e.decide(ALICE, "prod", select(rel(ORDERS, A.READ, "card")))
    assert d.allowed and dict(d.masks) == {ColumnSource(ORDERS, "card"): MaskKind.REDACT}
    assert not e.decide(ALICE, "prod", select(rel(ORDERS, A.READ, "card", "id"))).allowed


def test_user_mask_beats_role_allow_and_strongest_mask_kept() -> None:
    rules = [
        ALLOW_ORDERS,
        rule("col-ok", roles=["analyst"], table="orders", columns=["card"]),
        rule("user-mask", "mask", users=["alice"], table="orders", columns=["card"], mask="null"),
    ]
    d = PolicyEngine(rules, []).decide(ALICE, "prod", select(rel(ORDERS, A.READ, "card")))
    assert dict(d.masks) == {ColumnSource(ORDERS, "card"): MaskKind.NULL}
    # Two statements reaching one column through rules with different mask kinds.
    rules = [
        ALLOW_ORDERS,
        rule(
            "p",
            "mask",
            roles=["analyst"],
            table="orders",
            columns=["card"],
            mask="partial",
            statements=["select"],
        ),
        rule(
            "r",
            "mask",
            roles=["analyst"],
            table="orders",
            columns=["card"],
            mask="redact",
            statements=["explain"],
        ),
    ]
    a = an(stmt(K.SELECT, rel(ORDERS, A.READ, "card")), stmt(K.EXPLAIN, rel(ORDERS, A.READ, "card")))
    d = PolicyEngine(rules, []).decide(ALICE, "prod", a)
    assert dict(d.masks) == {ColumnSource(ORDERS, "card"): MaskKind.REDACT}


def test_denied_decision_carries_no_masks_or_filters() -> None:
    rules = [rule("m", "mask", roles=["analyst"], table="orders", columns=["card"], mask="redact")]
    d = PolicyEngine(rules, [rfilter("f", "region = {user.region}", roles=["analyst"])]).decide(
        ALICE, "prod", select(rel(ORDERS, A.READ, "card", "id"))
    )
    assert not d.allowed and not d.masks and not d.row_filters


# -- row filters ----------------------------------------------------------------------------------


def _where_constant(predicate: str) -> object:
    """The right-hand constant of ``col = <literal>`` as PostgreSQL parses it."""
    (raw,) = pg_parser.parse_sql("SELECT 1 WHERE " + predicate)
    sel = raw.stmt
    assert isinstance(sel, ast.SelectStmt)
    where = sel.whereClause
    assert isinstance(where, ast.A_Expr)
    const = where.rexpr
    assert isinstance(const, ast.A_Const)
    return const.val


def _filtered(p: Principal, *filters: RowFilter, analysis: Analysis | None = None) -> Decision:
    engine = PolicyEngine([rule("all", users=["*"])], list(filters))
    return engine.decide(p, "prod", analysis or select(rel(ORDERS, A.READ, "id")))


def test_row_filter_substitutes_attribute_as_literal() -> None:
    d = _filtered(ALICE, rfilter("own-region", "region = {user.region}", roles=["analyst"]))
    assert d.allowed
    assert dict(d.row_filters) == {ORDERS: "region = 'eu'"}
    assert "own-region" in d.rules_used


@pytest.mark.parametrize(
    "value",
    [
        "' OR 1=1 --",
        "x'); DROP TABLE orders; --",
        "\\' OR true --",
        "a\\\\'b",
        "\n' OR true OR '",
        "$$ OR true $$",
    ],
)
def test_row_filter_hostile_string_stays_one_literal(value: str) -> None:
    p = Principal("mallory", frozenset({"analyst"}), {"region": value})
    d = _filtered(p, rfilter("own-region", "region = {user.region}", roles=["analyst"]))
    assert d.allowed, d.reason
    const = _where_constant(d.row_filters[ORDERS])
    assert isinstance(const, ast.String) and const.sval == value


def test_row_filter_quote_doubling_exact_text() -> None:
    p = Principal("mallory", frozenset({"analyst"}), {"region": "' OR 1=1 --"})
    d = _filtered(p, rfilter("f", "region = {user.region}", roles=["analyst"]))
    assert d.row_filters[ORDERS] == "region = ''' OR 1=1 --'"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (42, "level = 42"),
        (-7, "level = (-7)"),
        (True, "level = true"),
        (False, "level = false"),
        (1.5, "level = 1.5"),
    ],
)
def test_row_filter_non_string_literals(value: object, expected: str) -> None:
    p = Principal("u", frozenset({"analyst"}), {"level": value})  # type: ignore[dict-item]
    d = _filtered(p, rfilter("f", "level = {user.level}", roles=["analyst"]))
    assert d.row_filters[ORDERS] == expected


def test_negative_number_cannot_start_a_comment() -> None:
    p = Principal("u", frozenset({"analyst"}), {"n": -1})
    d = _filtered(p, rfilter("f", "total -{user.n} > 0", roles=["analyst"]))
    assert d.allowed and d.row_filters[ORDERS] == "total -(-1) > 0"


def test_row_filter_user_name_placeholder() -> None:
    d = _filtered(ALICE, rfilter("own", "owner = {user.name}", users=["*"]))
    assert d.row_filters[ORDERS] == "owner = 'alice'"


def test_row_filter_missing_attribute_denies() -> None:
    d = _filtered(BOB, rfilter("own-region", "region = {user.region}", users=["*"]))
    assert not d.allowed
    assert d.rule == "own-region"
    assert "missing attribute" in d.reason and "region" in d.reason


def test_row_filters_on_one_table_are_anded() -> None:
    d = _filtered(
        ALICE,
        rfilter("region", "region = {user.region}", roles=["analyst"]),
        rfilter("level", "level <= {user.level}", users=["alice"]),
        rfilter("not-mine", "false", users=["bob"]),
    )
    assert d.row_filters[ORDERS] == "(region = 'eu') AND (level <= 3)"


def test_row_filters_apply_to_update_and_delete_not_insert() -> None:
    f = rfilter("region", "region = {user.region}", roles=["analyst"], table="*")
    a = an(
        stmt(K.INSERT, rel(CUSTOMERS, A.INSERT, "id")),
        stmt(K.UPDATE, rel(ORDERS, A.UPDATE, "total")),
        stmt(K.DELETE, rel(TableName("public", "items"), A.DELETE)),
    )
    d = _filtered(ALICE, f, analysis=a)
    assert set(d.row_filters) == {ORDERS, TableName("public", "items")}


def test_row_filter_scope_by_schema_and_database() -> None:
    f = rfilter("f", "true", users=["*"], schema="sales", database="prod")
    assert not _filtered(ALICE, f).row_filters
    other = TableName("sales", "orders")
    d = _filtered(ALICE, f, analysis=select(rel(other, A.READ, "id")))
    assert dict(d.row_filters) == {other: "true"}


@pytest.mark.parametrize(
    "predicate",
    [
        "region = '{user.region}'",
        "true; DROP TABLE orders",
        "true ORDER BY 1",
        "true) OR (true",
        "a = 1 -- c",
    ],
)
def test_bad_row_filter_predicates_refused_at_build(predicate: str) -> None:
    with pytest.raises(ValueError, match="row filter 'f'"):
        PolicyEngine([], [rfilter("f", predicate, users=["*"])])


def test_rewrite_directives() -> None:
    rules = [
        rule("all", users=["*"]),
        rule("m", "mask", users=["*"], table="customers", columns=["email"], mask="hash"),
    ]
    e = PolicyEngine(rules, [rfilter("f", "region = {user.region}", users=["*"])])
    d = e.decide(ALICE, "prod", select(rel(ORDERS, A.READ, "id"), rel(CUSTOMERS, A.READ, "email")))
    out = rewrite_directives(d)
    assert {t: (f, dict(m)) for t, (f, m) in out.items()} == {
        ORDERS: ("region = 'eu'", {}),
        CUSTOMERS: (None, {"email": MaskKind.HASH}),
    }


# -- construction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"access": ["reed"]}, "unknown access"),
        ({"statements": ["selct"]}, "unknown statement"),
        ({"table": "orders", "functions": ["pg_sleep"]}, "functions"),
    ],
)
def test_invalid_rules_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyEngine([rule("bad", users=["*"], **kw)], [])


# -- memoization ----------------------------------------------------------------------------------


def test_memo_does_not_leak_across_principals() -> None:
    e = PolicyEngine([ALLOW_ORDERS], [rfilter("f", "region = {user.region}", roles=["analyst"])])
    a = select(rel(ORDERS, A.READ, "id"))
    assert e.decide(ALICE, "prod", a).allowed
    # Same name, other roles: the cached allow must not be reused.
    impostor = Principal("alice", frozenset({"dev"}), ALICE.attributes)
    assert not e.decide(impostor, "prod", a).allowed
    # Other name, same roles and attributes.
    assert e.decide(Principal("zed", ALICE.roles, ALICE.attributes), "prod", a).allowed
    assert not e.decide(BOB, "prod", a).allowed
    # Same name and roles, other attributes: the row filter must follow them.
    us = Principal("alice", ALICE.roles, {"region": "us"})
    assert e.decide(us, "prod", a).row_filters[ORDERS] == "region = 'us'"
    assert e.decide(ALICE, "prod", a).row_filters[ORDERS] == "region = 'eu'"
    # Other database.
    e2 = PolicyEngine([rule("p", roles=["analyst"], database="prod")], [])
    assert e2.decide(ALICE, "prod", a).allowed
    assert not e2.decide(ALICE, "staging", a).allowed


def test_memo_keys_on_analysis_identity_not_equality() -> None:
    e = PolicyEngine([ALLOW_ORDERS], [], memo_size=2)
    allowed = select(rel(ORDERS))
    denied = select(rel(CUSTOMERS))
    for _ in range(3):
        assert e.decide(ALICE, "prod", allowed).allowed
        assert not e.decide(ALICE, "prod", denied).allowed
        # A fresh, equal analysis decides the same; eviction at size 2 keeps answers right.
        assert e.decide(ALICE, "prod", select(rel(ORDERS))).allowed


def test_memo_returns_the_same_decision_object() -> None:
    e = PolicyEngine([ALLOW_ORDERS], [])
    a = select(rel(ORDERS))
    assert e.decide(ALICE, "prod", a) is e.decide(ALICE, "prod", a)


def test_empty_request() -> None:
    d = PolicyEngine([], []).decide(ALICE, "prod", an())
    assert d.allowed and d.rule == "empty-request"


def test_row_filter_attribute_with_nul_denies() -> None:
    p = Principal("u", frozenset({"analyst"}), {"region": "eu\x00"})
    d = _filtered(p, rfilter("f", "region = {user.region}", roles=["analyst"]))
    assert not d.allowed and d.rule == "f"


def test_row_filter_non_finite_float_is_a_valid_literal() -> None:
    p = Principal("u", frozenset({"analyst"}), {"x": float("-inf")})
    d = _filtered(p, rfilter("f", "score > {user.x}", roles=["analyst"]))
    assert d.row_filters[ORDERS] == "score > '-Infinity'::double precision"


def test_admin_flag_grants_no_sql() -> None:
    root = Principal("root", frozenset(), admin=True)
    assert not PolicyEngine([ALLOW_ORDERS], []).decide(root, "prod", select(rel(ORDERS))).allowed


def _copy(direction: str, *relations: RelationAccess, table: TableName | None = ORDERS) -> Analysis:
    info = CopyInfo(direction, table, (), "stdio", "text")
    st = StatementAnalysis(index=0, kind=K.COPY, relations=relations, copy=info)
    return Analysis((st,), "fp", "norm")


def test_copy_to_reads_like_select() -> None:
    """COPY ... TO is a read: a rule granting reads to SELECT statements covers it, masks apply,
    and a gate naming "copy" can still stop it."""
    reader = rule("read-orders", users=["alice"], table="orders", access=["read"], statements=["select"])
    mask = rule("mask-total", "mask", users=["alice"], table="orders", columns=["total"], mask="redact")
    eng = PolicyEngine([reader, mask], [])
    out = eng.decide(ALICE, "prod", _copy("to", rel(ORDERS, A.READ, "id", "total")))
    assert out.allowed and out.masks == {ColumnSource(ORDERS, "total"): MaskKind.REDACT}
    # COPY (SELECT 1) TO STDOUT touches no relation: the SELECT gate allows it.
    gate = rule("select-gate", users=["*"], statements=["select"])
    assert PolicyEngine([gate], []).decide(ALICE, "prod", _copy("to", table=None)).allowed
    # Reading is not inserting: the same rule does not allow COPY FROM.
    into = _copy("from", rel(ORDERS, A.INSERT, "id"))
    denied = eng.decide(ALICE, "prod", into)
    assert not denied.allowed and denied.rule == DEFAULT_DENY
    # A gate that blocks "copy" stops exports whatever the table rules say.
    no_copy = rule("no-copy", "block", users=["*"], statements=["copy"])
    blocked = PolicyEngine([reader, no_copy], []).decide(
        ALICE, "prod", _copy("to", rel(ORDERS, A.READ, "id"))
    )
    assert not blocked.allowed and blocked.rule == "no-copy"


def test_cursors_read_like_select() -> None:
    """DECLARE ... CURSOR FOR a SELECT is decided as that SELECT (masks included); FETCH, MOVE and
    CLOSE pass a select gate; a gate naming "cursor" can block cursors; "*" rules cover them."""
    reader = rule("read-orders", users=["alice"], table="orders", access=["read"], statements=["select"])
    mask = rule("mask-total", "mask", users=["alice"], table="orders", columns=["total"], mask="redact")
    eng = PolicyEngine([reader, mask], [])
    declare = an(stmt(K.CURSOR, rel(ORDERS, A.READ, "id", "total")))
    out = eng.decide(ALICE, "prod", declare)
    assert out.allowed and out.masks == {ColumnSource(ORDERS, "total"): MaskKind.REDACT}
    # The same cursor over a table the reader may not see is denied by default.
    other = eng.decide(ALICE, "prod", an(stmt(K.CURSOR, rel(CUSTOMERS, A.READ, "email"))))
    assert not other.allowed and other.rule == DEFAULT_DENY
    # A cursor FOR UPDATE asks for update, which a select rule never grants.
    locking = an(stmt(K.CURSOR, rel(ORDERS, A.READ, "id"), rel(ORDERS, A.UPDATE)))
    assert not eng.decide(ALICE, "prod", locking).allowed
    # FETCH / CLOSE touch no relation: without a gate they are denied, with a select gate allowed.
    fetch = an(stmt(K.CURSOR))
    assert not eng.decide(ALICE, "prod", fetch).allowed
    assert PolicyEngine([reader, SELECT_GATE], []).decide(ALICE, "prod", fetch).allowed
    # A database-wide "*" rule covers cursors (they are not "other").
    assert PolicyEngine([ADMIN_ALL], []).decide(ALICE, "prod", declare).allowed
    assert PolicyEngine([ADMIN_ALL], []).decide(ALICE, "prod", fetch).allowed
    # A gate blocking "cursor" stops them whatever the table rules say; a DML rule never opens one.
    no_cursor = rule("no-cursors", "block", users=["*"], statements=["cursor"])
    blocked = PolicyEngine([reader, SELECT_GATE, no_cursor], []).decide(ALICE, "prod", declare)
    assert not blocked.allowed and blocked.rule == "no-cursors"
    writer = rule("write-orders", users=["alice"], table="orders", access=["*"], statements=["dml"])
    assert not PolicyEngine([writer], []).decide(ALICE, "prod", declare).allowed


def _set_config(*settings: str, functions: tuple[str, ...] = ()) -> Analysis:
    base = stmt(K.SELECT, functions=functions)
    return Analysis(
        statements=(
            StatementAnalysis(
                index=0,
                kind=K.SELECT,
                functions=base.functions,
                settings=frozenset(settings),
                literal_bound=True,
            ),
        ),
        fingerprint="x",
        normalized="x",
    )


def test_set_config_of_a_plain_setting_is_decided_as_set() -> None:
    select_gate = rule("select-gate", users=["*"], statements=["select"])
    set_gate = rule("set-gate", users=["*"], statements=["set"])
    jit = _set_config("jit", functions=("current_setting",))
    # Without a rule for SET it is denied, naming what to add.
    denied = PolicyEngine([select_gate], []).decide(ALICE, "prod", jit)
    assert not denied.allowed and denied.rule == DEFAULT_DENY and "'set'" in denied.reason
    # With one it is allowed, and the rule is listed as used.
    out = PolicyEngine([select_gate, set_gate], []).decide(ALICE, "prod", jit)
    assert out.allowed and "set-gate" in out.rules_used
    # A database-wide "*" rule allows SET, so it allows this too.
    assert PolicyEngine([ADMIN_ALL], []).decide(ALICE, "prod", jit).allowed
    # Blocking SET blocks it.
    no_set = rule("no-set-for-analysts", "block", roles=["analyst"], statements=["set"])
    blocked = PolicyEngine([select_gate, set_gate, no_set], []).decide(ALICE, "prod", jit)
    assert not blocked.allowed and blocked.rule == "no-set-for-analysts"
    # The function form the analyser left as a function (role, search_path, ...) is still dangerous.
    role = _set_config(functions=("set_config",))
    assert not PolicyEngine([select_gate, set_gate, ADMIN_ALL], []).decide(ALICE, "prod", role).allowed
