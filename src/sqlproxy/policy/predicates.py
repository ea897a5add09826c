"""Row-filter predicates: ``{user.NAME}`` substitution as safe SQL literals, and validation that
the result is one plain boolean expression (so no attribute value can change the statement)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from pglast import ast
from pglast import parser as pg_parser

from sqlproxy.policy.principal import AttributeValue

PLACEHOLDER = re.compile(r"\{user\.([A-Za-z_][A-Za-z0-9_]*)\}")


class PredicateError(ValueError):
    pass


class MissingAttribute(PredicateError):
    def __init__(self, attribute: str) -> None:
        super().__init__(f"missing attribute {attribute!r}")
        self.attribute = attribute


def sql_literal(value: AttributeValue) -> str:
    """``value`` as a SQL literal that means the same whatever the server's settings."""
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        # Parenthesised when negative: "x -{user.n}" must not become the comment "x --5".
        return f"({value})" if value < 0 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"'{value!r}'::double precision".replace("inf", "Infinity").replace("nan", "NaN")
        text = repr(value)
        return f"({text})" if value < 0 else text
    if isinstance(value, str):
        if "\x00" in value:
            raise PredicateError("attribute value contains a NUL character")
        body = value.replace("'", "''")
        if "\\" in value:
            # E'' reads backslashes the same with standard_conforming_strings on or off; a plain
            # '...' would let "\'" close the literal on a server with it off.
            return "E'" + body.replace("\\", "\\\\") + "'"
        return "'" + body + "'"
    raise PredicateError(f"unsupported attribute type {type(value).__name__}")


def substitute(template: str, user: str, attributes: Mapping[str, AttributeValue]) -> str:
    """Replace every placeholder; raises MissingAttribute naming the first attribute absent."""

    def repl(m: re.Match[str]) -> str:
        key = m.group(1)
        if key == "name":
            return sql_literal(user)
        try:
            value = attributes[key]
        except KeyError:
            raise MissingAttribute(key) from None
        return sql_literal(value)

    return PLACEHOLDER.sub(repl, template)


_SELECT_FIELDS_MUST_BE_EMPTY = (
    "distinctClause",
    "intoClause",
    "fromClause",
    "groupClause",
    "havingClause",
    "windowClause",
    "valuesLists",
    "sortClause",
    "limitOffset",
    "limitCount",
    "lockingClause",
    "withClause",
    "larg",
    "rarg",
)


def validate(predicate: str) -> None:
    """Raise PredicateError unless ``predicate`` is exactly one boolean-position expression.

    It is parsed as the WHERE of ``SELECT 1 WHERE ...``: anything that escapes the expression (a
    second statement, ORDER BY, UNION, a closing parenthesis, ...) shows up as a syntax error or a
    non-empty clause.
    """
    try:
        stmts = pg_parser.parse_sql("SELECT 1 WHERE " + predicate)
    except pg_parser.ParseError as e:
        raise PredicateError(f"not a valid SQL expression: {e}") from None
    if len(stmts) != 1:
        raise PredicateError("more than one statement")
    sel = stmts[0].stmt
    if not isinstance(sel, ast.SelectStmt) or sel.whereClause is None:
        raise PredicateError("not a plain WHERE expression")
    if any(getattr(sel, f, None) for f in _SELECT_FIELDS_MUST_BE_EMPTY) or sel.op not in (None, 0):
        raise PredicateError("not a plain WHERE expression")
    targets = sel.targetList or ()
    if len(targets) != 1:
        raise PredicateError("not a plain WHERE expression")


def check_template(template: str) -> None:
    """Validate a configured predicate once, at engine construction (``sqlproxy config check``)."""
    if "--" in template or "/*" in template:
        # The rewriter may splice the text inside parentheses; a comment would swallow them.
        raise PredicateError("comments are not allowed in a row filter predicate")
    # A quoted string stands in for every placeholder: a placeholder written inside quotes
    # ('{user.x}') then no longer parses, which is the mistake this is meant to catch.
    validate(PLACEHOLDER.sub("'x'", template))
