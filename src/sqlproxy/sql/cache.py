"""A bounded LRU of analyses, shared across requests whose statements have the same shape.

Lookup order: the exact text (cheap, and the only key for statements whose analysis depends on
literals), then ``normalize(sql)`` (literals replaced by ``$n``, ~6 µs against ~100-500 µs for a
parse and analysis). An analysis is stored under the normalized text only when every statement
is plain SELECT/INSERT/UPDATE/DELETE/MERGE whose analysis read no literal: for utility statements
literals matter (``SET search_path = x`` normalizes to ``SET search_path = $1``, COPY names
files, EXPLAIN options...), and so does the setting a ``set_config('name', ...)`` call names.
``fingerprint`` is never a key: it ignores column aliases, which change ``outputs``.

Every key also holds the search_path (it decides which relation a name means) and the catalog
snapshot's version, so loading a new snapshot makes every older entry unreachable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pglast.parser import ParseError, normalize

from sqlproxy.sql.analyzer import DEFAULT_SEARCH_PATH, analyze
from sqlproxy.sql.catalog import Catalog
from sqlproxy.sql.model import Analysis, StatementKind

SHAPE_CACHEABLE = frozenset(
    {
        StatementKind.SELECT,
        StatementKind.INSERT,
        StatementKind.UPDATE,
        StatementKind.DELETE,
        StatementKind.MERGE,
    }
)

_Key = tuple[str, str, tuple[str, ...], tuple[str, ...], int]


def shape_cacheable(analysis: Analysis) -> bool:
    return bool(analysis.statements) and all(
        s.kind in SHAPE_CACHEABLE and not s.literal_bound for s in analysis.statements
    )


class AnalysisCache:
    def __init__(self, maxsize: int = 10_000) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[_Key, Analysis] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get_or_analyze(
        self,
        sql: str,
        catalog: Catalog,
        search_path: Sequence[str],
        *,
        default_search_path: Sequence[str] = DEFAULT_SEARCH_PATH,
    ) -> Analysis:
        path = tuple(search_path)
        default = tuple(default_search_path)
        exact: _Key = ("exact", sql, path, default, catalog.version)
        found = self._get(exact)
        if found is not None:
            return found
        try:
            shape: _Key | None = ("shape", normalize(sql), path, default, catalog.version)
        except ParseError:
            shape = None  # analyze() below raises the SqlSyntaxError with its position
        if shape is not None:
            found = self._get(shape)
            if found is not None:
                return found
        self.misses += 1
        analysis = analyze(sql, catalog, path, default_search_path=default)
        self._put(shape if shape is not None and shape_cacheable(analysis) else exact, analysis)
        return analysis

    def _get(self, key: _Key) -> Analysis | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return found

    def _put(self, key: _Key, analysis: Analysis) -> None:
        self._entries[key] = analysis
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
