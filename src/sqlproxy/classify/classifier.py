"""Labelling result columns: by lineage from configured column rules, and by sampling values.

A column's labels are the union of
  (a) the labels of every rule matching any base-table column it derives from (the analyser has
      already followed aliases, expressions, views and CTEs down to ``OutputColumn.sources``), so
      ``SELECT lower(email) AS e`` is still an e-mail column; and
  (b) the labels of value detectors that match at least ``min_match_ratio`` of the non-empty
      values among the first ``sample_rows`` rows, which catches PII in columns nobody declared.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import translate

from sqlproxy.classify.detectors import Detector, DetectorRegistry
from sqlproxy.config.models import ClassificationConfig
from sqlproxy.memo import IdMemo
from sqlproxy.sql.model import ColumnSource, OutputColumn

# Distinct source sets seen in practice are bounded by the schema, but the cache must not grow
# without limit if something (generated SQL over many tables) keeps producing new ones.
_LINEAGE_CACHE_MAX = 8192


class ClassificationRuleError(ValueError):
    """A rule's column pattern cannot be used. ``path`` is its key path in the config."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Rule:
    # One compiled glob per segment, right-aligned: a rule "email" constrains only the column,
    # "users.email" the table and column, "public.users.email" all three.
    segments: tuple[re.Pattern[str], ...]
    label: str

    def matches(self, source: ColumnSource) -> bool:
        parts = (source.table.schema, source.table.name, source.column)
        n = len(self.segments)
        return all(p.match(v) is not None for p, v in zip(self.segments, parts[3 - n :], strict=True))


def _compile_rule(index: int, pattern: str, label: str) -> _Rule:
    path = f"classification.rules.{index}.columns"
    parts = pattern.split(".")
    if not 1 <= len(parts) <= 3 or any(not p for p in parts):
        raise ClassificationRuleError(path, f"{pattern!r} is not a [schema.][table.]column pattern")
    # Matched per segment so that "*" stands for exactly one identifier (a quoted identifier may
    # itself contain dots, which a glob over the joined string would misread). Case-insensitive: the
    # analyser lower-cases unquoted identifiers while config authors may not; over-labelling a
    # column is safer than missing one.
    segs = tuple(re.compile(translate(p), re.IGNORECASE) for p in parts)
    return _Rule(segs, label)


class Classifier:
    def __init__(self, config: ClassificationConfig, detectors: Iterable[Detector] | None = None) -> None:
        self.config = config
        self.enabled = config.enabled
        self.sample_rows = config.sample_rows
        self.min_match_ratio = config.min_match_ratio
        self.detectors: tuple[Detector, ...] = tuple(
            DetectorRegistry.default() if detectors is None else detectors
        )
        self._rules = tuple(_compile_rule(i, r.columns, r.classification) for i, r in enumerate(config.rules))
        self._lineage_cache: dict[frozenset[ColumnSource], frozenset[str]] = {}
        self._outputs_cache: IdMemo[Sequence[OutputColumn], dict[str, list[str]]] = IdMemo(_LINEAGE_CACHE_MAX)

    # -- lineage -------------------------------------------------------------------------------
    def source_labels(self, source: ColumnSource) -> frozenset[str]:
        """Labels the configured rules give one base-table column."""
        return frozenset(r.label for r in self._rules if r.matches(source))

    def lineage_labels(self, sources: frozenset[ColumnSource]) -> frozenset[str]:
        """Labels carried by any of ``sources``. Cached per source set."""
        if not self._rules or not sources:
            return frozenset()
        hit = self._lineage_cache.get(sources)
        if hit is not None:
            return hit
        labels = frozenset(label for s in sources for label in self.source_labels(s))
        if len(self._lineage_cache) >= _LINEAGE_CACHE_MAX:
            self._lineage_cache.clear()
        self._lineage_cache[sources] = labels
        return labels

    # -- values --------------------------------------------------------------------------------
    def value_labels(self, values: Sequence[object]) -> frozenset[str]:
        """Labels of detectors matching at least ``min_match_ratio`` of the non-empty values.

        Empty and blank strings count as absent like NULL: an optional e-mail column that is
        mostly unset is still an e-mail column.
        """
        present = [v for v in values if v is not None and not (isinstance(v, str) and not v.strip())]
        if not present:
            return frozenset()
        n = len(present)
        needed = self.min_match_ratio * n
        out: set[str] = set()
        for d in self.detectors:
            if d.label in out:
                continue
            hits = 0
            for i, v in enumerate(present):
                if d.matches(v):
                    hits += 1
                    if hits >= needed:
                        out.add(d.label)
                        break
                elif hits + (n - i - 1) < needed:
                    break  # the rest cannot reach the ratio any more
        return frozenset(out)

    # -- columns -------------------------------------------------------------------------------
    def classify_positional(
        self, outputs: Sequence[OutputColumn], rows: Sequence[Sequence[object]] | None = None
    ) -> list[list[str]]:
        """Sorted labels for each output column, by position."""
        if not self.enabled:
            return [[] for _ in outputs]
        sample: Sequence[Sequence[object]] = rows[: self.sample_rows] if rows else ()
        out: list[list[str]] = []
        for i, col in enumerate(outputs):
            labels = self.lineage_labels(col.sources)
            if sample:
                values = [row[i] for row in sample if i < len(row)]
                labels = labels | self.value_labels(values)
            out.append(sorted(labels))
        return out

    def classify(
        self, outputs: Sequence[OutputColumn], rows: Sequence[Sequence[object]] | None = None
    ) -> dict[str, list[str]]:
        """Sorted labels keyed by output column name. Columns sharing a name (``SELECT a.id, b.id``)
        share one entry holding the union of their labels, so no label is lost.

        Without rows the answer depends only on ``outputs``, which an analysis shares with every
        statement of its shape: it is made once per outputs object and shared (read-only)."""
        if not rows:
            hit = self._outputs_cache.get(outputs)
            if hit is not None:
                return hit
            return self._outputs_cache.put(outputs, self._classify(outputs, None))
        return self._classify(outputs, rows)

    def _classify(
        self, outputs: Sequence[OutputColumn], rows: Sequence[Sequence[object]] | None
    ) -> dict[str, list[str]]:
        merged: dict[str, set[str]] = {}
        for col, labels in zip(outputs, self.classify_positional(outputs, rows), strict=True):
            merged.setdefault(col.name, set()).update(labels)
        return {name: sorted(labels) for name, labels in merged.items()}
