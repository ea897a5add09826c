"""A small demo-like catalog shared by the tests/unit/test_sql_*.py modules."""

from __future__ import annotations

from typing import Any

from sqlproxy.sql.catalog import Catalog
from sqlproxy.sql.model import ColumnSource, TableName

SPEC: dict[str, dict[str, Any]] = {
    "public.customers": {"columns": ["id", "name", "email", "phone", "region"]},
    "public.orders": {"columns": ["id", "customer_id", "total", "created_at"]},
    "public.order_items": {"columns": ["id", "order_id", "sku", "qty"]},
    "public.employees": {"columns": ["id", "name", "salary", "ssn", "dept"]},
    "public.customer_emails": {
        "kind": "view",
        "columns": ["id", "contact"],
        "definition": "SELECT customers.id, customers.email AS contact FROM public.customers",
    },
    "public.eu_contacts": {
        "kind": "view",
        "columns": ["contact"],
        "definition": "SELECT lower(contact) AS contact FROM public.customer_emails",
    },
    "public.Customers": {"columns": ["id", "nickname"]},
    "private.customers": {"columns": ["id", "secret"]},
    "pg_catalog.pg_class": {"columns": ["oid", "relname"]},
}


def demo_catalog() -> Catalog:
    return Catalog.from_dict(SPEC)


def t(name: str) -> TableName:
    schema, _, rel = name.partition(".")
    return TableName(schema, rel)


def src(qualified: str) -> ColumnSource:
    schema, rel, col = qualified.split(".")
    return ColumnSource(TableName(schema, rel), col)
