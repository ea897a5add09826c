import ipaddress
from dataclasses import dataclass

import pytest

from sqlproxy.classify.classifier import Classifier
from sqlproxy.classify.detectors import CREDIT_CARD, EMAIL, IP_ADDRESS, PHONE, SSN
from sqlproxy.config.loader import ConfigError, parse_config
from sqlproxy.config.models import ClassificationConfig, ColumnClassification
from sqlproxy.sql.model import ColumnSource, OutputColumn, TableName

USERS = TableName("public", "users")
EMPLOYEES = TableName("public", "employees")
ORDERS = TableName("sales", "orders")


def src(table: TableName, column: str) -> ColumnSource:
    return ColumnSource(table, column)


def out(name: str, *sources: ColumnSource, direct: bool = False) -> OutputColumn:
    return OutputColumn(name, frozenset(sources), direct)


def make(*rules: tuple[str, str], **kw: object) -> Classifier:
    cfg = ClassificationConfig(
        rules=tuple(ColumnClassification(columns=c, classification=label) for c, label in rules),
        **kw,
    )
    return Classifier(cfg)


RULES = (
    ("*.*.email", EMAIL),
    ("public.employees.ssn", SSN),
    ("public.users.phone*", PHONE),
    ("card_number", CREDIT_CARD),  # column only: any schema, any table
)


# -- lineage -----------------------------------------------------------------------------------


def test_direct_and_aliased_columns_carry_the_rule_label() -> None:
    c = make(*RULES)
    outputs = [
        out("email", src(USERS, "email"), direct=True),
        out("contact", src(USERS, "email"), direct=True),  # SELECT email AS contact
        out("id", src(USERS, "id"), direct=True),
    ]
    assert c.classify(outputs, None) == {"email": [EMAIL], "contact": [EMAIL], "id": []}


def test_expressions_views_and_ctes_carry_labels_of_every_source() -> None:
    c = make(*RULES)
    outputs = [
        # lower(email)
        out("lower", src(USERS, "email")),
        # concat(e.ssn, ' ', u.email) from a view over both tables
        out("who", src(EMPLOYEES, "ssn"), src(USERS, "email"), src(EMPLOYEES, "name")),
        # a CTE column computed from a non-PII column
        out("total", src(ORDERS, "amount")),
        # count(*): no sources at all
        out("count"),
    ]
    assert c.classify(outputs) == {
        "lower": [EMAIL],
        "who": [EMAIL, SSN],
        "total": [],
        "count": [],
    }


def test_rule_globs_are_per_segment_and_right_aligned() -> None:
    c = make(*RULES)
    assert c.source_labels(src(ORDERS, "email")) == {EMAIL}
    assert c.source_labels(src(EMPLOYEES, "ssn")) == {SSN}
    assert c.source_labels(src(TableName("hr", "employees"), "ssn")) == set()
    assert c.source_labels(src(USERS, "phone_home")) == {PHONE}
    assert c.source_labels(src(EMPLOYEES, "phone")) == set()
    assert c.source_labels(src(TableName("billing", "cards"), "card_number")) == {CREDIT_CARD}
    assert c.source_labels(src(USERS, "email_verified_at")) == set()  # "email" is not "email*"
    # a "*" stands for one identifier: a quoted column name containing a dot does not shift segments
    assert c.source_labels(src(TableName("public", "x"), "a.email")) == set()


def test_rule_matching_ignores_case() -> None:
    c = make(("Public.Employees.SSN", SSN))
    assert c.source_labels(src(EMPLOYEES, "ssn")) == {SSN}


def test_two_rules_one_column_give_both_labels_sorted() -> None:
    c = make(("*.*.contact", PHONE), ("public.users.contact", EMAIL))
    assert c.classify([out("contact", src(USERS, "contact"))]) == {"contact": [EMAIL, PHONE]}


@pytest.mark.parametrize("pattern", ["a.b.c.d", "", "public..email", "."])
def test_bad_rule_pattern_names_its_key_path(pattern: str) -> None:
    rules = [{"columns": "*.*.email", "classification": EMAIL}, {"columns": pattern, "classification": SSN}]
    with pytest.raises(ConfigError) as ei:
        parse_config({"classification": {"rules": rules}})
    assert ei.value.problems[0].path == "classification.rules.1.columns"


def test_lineage_results_are_cached_per_source_set() -> None:
    c = make(*RULES)
    sources = frozenset({src(USERS, "email"), src(USERS, "id")})
    first = c.lineage_labels(sources)
    # An equal but distinct frozenset hits the same entry: the cache is keyed by value.
    assert c.lineage_labels(frozenset(set(sources))) is first
    assert first == {EMAIL}


def test_same_output_name_twice_merges_labels() -> None:
    c = make(*RULES)
    outputs = [out("x", src(USERS, "email")), out("x", src(EMPLOYEES, "ssn")), out("y")]
    assert c.classify(outputs) == {"x": [EMAIL, SSN], "y": []}
    assert c.classify_positional(outputs) == [[EMAIL], [SSN], []]


def test_disabled_classifier_labels_nothing() -> None:
    c = make(*RULES, enabled=False)
    rows = [("alice@example.com",)]
    assert c.classify([out("email", src(USERS, "email"))], rows) == {"email": []}


# -- value sampling ----------------------------------------------------------------------------


def test_undeclared_columns_are_labelled_from_their_values() -> None:
    c = make()
    outputs = [out("a"), out("b"), out("c"), out("d"), out("e")]
    rows = [
        ("alice@example.com", "555-123-4567", 1, "4111 1111 1111 1111", ipaddress.ip_address("10.1.2.3")),
        ("bob@example.org", "(555) 987-6543", 2, "5555555555554444", ipaddress.ip_address("2001:db8::5")),
    ]
    assert c.classify(outputs, rows) == {
        "a": [EMAIL],
        "b": [PHONE],
        "c": [],
        "d": [CREDIT_CARD],
        "e": [IP_ADDRESS],
    }


def test_lineage_and_values_are_unioned() -> None:
    c = make(*RULES)
    outputs = [out("note", src(USERS, "email"))]
    rows = [("555-123-4567",), ("555-987-6543",)]
    assert c.classify(outputs, rows) == {"note": [EMAIL, PHONE]}


def column(values: list[object]) -> list[tuple[object]]:
    return [(v,) for v in values]


@pytest.mark.parametrize(
    ("ratio", "values", "labelled"),
    [
        # 3 of 5 match = 0.6
        (0.6, ["a@example.com", "b@example.com", "c@example.com", "n/a", "unknown"], True),
        (0.61, ["a@example.com", "b@example.com", "c@example.com", "n/a", "unknown"], False),
        # NULLs and blanks are not counted: 2 of 2 present values match
        (1.0, ["a@example.com", None, "", "  ", "b@example.com", None], True),
        # all NULL: nothing to judge
        (0.1, [None, None, None], False),
        # 1 of 10
        (0.2, ["a@example.com"] + ["x"] * 9, False),
        (0.1, ["a@example.com"] + ["x"] * 9, True),
        # the match comes last: the early exit must not give up too soon
        (0.2, ["x"] * 4 + ["a@example.com"], True),
    ],
)
def test_min_match_ratio(ratio: float, values: list[object], labelled: bool) -> None:
    c = make(min_match_ratio=ratio)
    got = c.classify([out("v")], column(values))
    assert got == {"v": [EMAIL] if labelled else []}


def test_only_sample_rows_are_inspected() -> None:
    values: list[object] = ["n/a"] * 5
    values += ["a@example.com"] * 100
    assert make(sample_rows=5, min_match_ratio=0.5).classify([out("v")], column(values)) == {"v": []}
    assert make(sample_rows=10, min_match_ratio=0.5).classify([out("v")], column(values)) == {"v": [EMAIL]}
    assert make(sample_rows=0, min_match_ratio=0.1).classify([out("v")], column(values)) == {"v": []}


def test_no_rows_or_short_rows_do_not_fail() -> None:
    c = make()
    outputs = [out("a"), out("b")]
    assert c.classify(outputs, []) == {"a": [], "b": []}
    assert c.classify(outputs, None) == {"a": [], "b": []}
    assert c.classify(outputs, [("a@example.com",)]) == {"a": [EMAIL], "b": []}


def test_custom_detectors_replace_the_defaults() -> None:
    @dataclass(frozen=True)
    class Badge:
        label: str = "Internal.Badge"

        def matches(self, value: object) -> bool:
            return isinstance(value, str) and value.startswith("BADGE-")

    c = Classifier(ClassificationConfig(), detectors=[Badge()])
    rows = [("BADGE-1", "alice@example.com")]
    assert c.classify([out("b"), out("e")], rows) == {"b": ["Internal.Badge"], "e": []}


def test_integers_are_never_phone_numbers() -> None:
    c = make(min_match_ratio=0.1)
    rows = [(5551234567, 4111111111111111, "5551234567")]
    assert c.classify([out("total"), out("id"), out("ref")], rows) == {"total": [], "id": [], "ref": []}
