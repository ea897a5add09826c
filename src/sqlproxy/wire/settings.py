"""A client's session settings, kept by the proxy so they follow the client from one server
connection to the next in transaction pool mode.

The settings are the end user's identity (``sqlproxy.user``), the statement timeout of the
database, the whitelisted startup parameters, and every session-level ``SET`` the client ran.
``key`` changes whenever they do; a server connection remembers the key it was last set up
with, so applying them costs one pipelined Query only when the connection last served
someone (or something) else.
"""

from __future__ import annotations

import re

from pglast import ast, parse_sql
from pglast.parser import ParseError

# Startup parameters passed on to the server. Anything else (role, session_authorization,
# options=-c ...) could change privileges or behaviour behind the policy's back.
STARTUP_SETTINGS = frozenset(
    {"application_name", "datestyle", "timezone", "intervalstyle", "extra_float_digits", "search_path"}
)
_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")

# VariableSetStmt.kind values (pglast.enums.VariableSetKind).
_VAR_SET_VALUE, _VAR_SET_DEFAULT, _VAR_SET_CURRENT, _VAR_SET_MULTI, _VAR_RESET, _VAR_RESET_ALL = range(6)


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class ClientSettings:
    def __init__(self, user: str, startup: dict[str, str], statement_timeout_ms: int) -> None:
        base = [f'SET "sqlproxy.user" = {quote_literal(user)}']
        if statement_timeout_ms:
            base.append(f"SET statement_timeout = {int(statement_timeout_ms)}")
        self.startup: dict[str, str] = {}
        for name, value in startup.items():
            low = name.lower()
            if low in STARTUP_SETTINGS and _GUC_NAME.match(name) and "\0" not in value:
                self.startup[low] = f"SET {low} = {quote_literal(value)}"
        self._base = tuple(base)
        self.sets: dict[str, str] = {}
        self._pending: list[str] = []
        self.key: tuple[str, ...] = ()
        self._rekey()

    def _rekey(self) -> None:
        merged = {**self.startup, **self.sets}
        self.key = self._base + tuple(merged.values())

    def setup_query(self) -> bytes:
        """The Query frame that puts a server connection into this client's state."""
        sql = ";".join(("RESET ALL", *self.key)).encode("utf-8")
        return b"Q" + (len(sql) + 5).to_bytes(4, "big") + sql + b"\0"

    def record(self, text: str, in_transaction: bool) -> bool:
        """Note a SET/RESET the client ran successfully. Returns False when its effect on the
        server cannot be tracked exactly (the connection must then be set up afresh)."""
        if in_transaction:
            self._pending.append(text)
            return True
        return self._apply(text)

    def end_transaction(self, committed: bool) -> bool:
        pending, self._pending = self._pending, []
        exact = True
        if committed:
            for text in pending:
                exact = self._apply(text) and exact
        return exact

    def _apply(self, text: str) -> bool:
        try:
            stmts = parse_sql(text)
        except ParseError:
            return False
        exact = True
        for raw in stmts:
            st = raw.stmt
            if not isinstance(st, ast.VariableSetStmt):
                return False
            kind = int(st.kind or 0)
            if st.is_local or kind == _VAR_SET_MULTI:
                continue  # transaction-scoped: gone at the end of the transaction
            name = (st.name or "").lower()
            if kind == _VAR_RESET_ALL:
                self.sets.clear()
                exact = False
            elif kind in (_VAR_RESET, _VAR_SET_DEFAULT):
                self.sets.pop(name, None)
                if name in self.startup:
                    exact = False
            else:
                self.sets[name] = text
        self._rekey()
        return exact
