"""Result column names as PostgreSQL chooses them (FigureColname in parse_target.c)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pglast import ast
from pglast.enums import A_Expr_Kind, MinMaxOp, SubLinkType

ANONYMOUS = "?column?"

_JSON_NAMES = {
    "JsonObjectConstructor": "json_object",
    "JsonArrayConstructor": "json_array",
    "JsonArrayQueryConstructor": "json_array",
    "JsonObjectAgg": "json_objectagg",
    "JsonArrayAgg": "json_arrayagg",
    "JsonParseExpr": "json",
    "JsonScalarExpr": "json_scalar",
    "JsonSerializeExpr": "json_serialize",
}


def string_fields(items: Sequence[Any] | None) -> tuple[str, ...]:
    return tuple(i.sval or "" for i in items or () if isinstance(i, ast.String))


def figure_colname(node: Any) -> str:
    name, _ = _figure(node)
    return name or ANONYMOUS


def _figure(node: Any) -> tuple[str | None, int]:
    """The name and its strength: 2 for a real name, 1 for a fallback (type or "case")."""
    if isinstance(node, ast.ColumnRef):
        last = node.fields[-1] if node.fields else None
        return (last.sval, 2) if isinstance(last, ast.String) else (None, 0)
    if isinstance(node, ast.A_Indirection):
        for ind in reversed(node.indirection or ()):
            if isinstance(ind, ast.String):
                return ind.sval, 2
        return _figure(node.arg)
    if isinstance(node, ast.FuncCall):
        names = string_fields(node.funcname)
        return (names[-1], 2) if names else (None, 0)
    if isinstance(node, ast.A_Expr):
        return ("nullif", 2) if node.kind == A_Expr_Kind.AEXPR_NULLIF else (None, 0)
    if isinstance(node, ast.TypeCast):
        name, strength = _figure(node.arg)
        if strength <= 1 and node.typeName is not None:
            type_names = string_fields(node.typeName.names)
            if type_names:
                return type_names[-1], 1
        return name, strength
    if isinstance(node, ast.CollateClause):
        return _figure(node.arg)
    if isinstance(node, ast.GroupingFunc):
        return "grouping", 2
    if isinstance(node, ast.MergeSupportFunc):
        return "merge_action", 2
    if isinstance(node, ast.SubLink):
        return _figure_sublink(node)
    if isinstance(node, ast.CaseExpr):
        name, strength = _figure(node.defresult)
        return (name, strength) if strength > 1 else ("case", 1)
    if isinstance(node, ast.A_ArrayExpr):
        return "array", 2
    if isinstance(node, ast.RowExpr):
        return "row", 2
    if isinstance(node, ast.CoalesceExpr):
        return "coalesce", 2
    if isinstance(node, ast.MinMaxExpr):
        return ("greatest" if node.op == MinMaxOp.IS_GREATEST else "least"), 2
    if isinstance(node, ast.SQLValueFunction) and node.op is not None:
        op = node.op.name.removeprefix("SVFOP_").lower()
        return op.removesuffix("_n"), 2
    if isinstance(node, ast.XmlExpr) and node.op is not None:
        op = node.op.name.removeprefix("IS_").lower()
        return (None, 0) if op == "document" else (op, 2)
    if isinstance(node, ast.XmlSerialize):
        return "xmlserialize", 2
    if isinstance(node, ast.JsonFuncExpr) and node.op is not None:
        return node.op.name.lower().removesuffix("_op"), 2
    json_name = _JSON_NAMES.get(type(node).__name__)
    if json_name is not None:
        return json_name, 2
    return None, 0


def _figure_sublink(node: ast.SubLink) -> tuple[str | None, int]:
    if node.subLinkType == SubLinkType.EXISTS_SUBLINK:
        return "exists", 2
    if node.subLinkType == SubLinkType.ARRAY_SUBLINK:
        return "array", 2
    if node.subLinkType in (SubLinkType.EXPR_SUBLINK, SubLinkType.MULTIEXPR_SUBLINK):
        sub = node.subselect
        if isinstance(sub, ast.SelectStmt) and sub.targetList:
            first = sub.targetList[0]
            if isinstance(first, ast.ResTarget):
                if first.name:
                    return first.name, 2
                return _figure(first.val)
    return None, 0
