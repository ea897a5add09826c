"""The row filter / column mask rewrite, done once per statement shape instead of once per statement.

``rewrite()`` parses, rewrites and deparses every statement (hundreds of microseconds, mostly
building and printing pglast's Python AST). Statements that differ only in their constants are
rewritten the same way, because the rewrite never looks at a constant: it acts on relations,
column references, CTE names and statement kinds. So:

1. The statement's *shape* is ``pglast.parser.normalize(sql)`` (libpg_query, C, microseconds):
   the text with each constant replaced by a ``$n`` placeholder numbered after the statement's
   own highest ``$n``. The cache key is the shape plus everything else the rewrite depends on:
   the directives (row filters and masks), the catalog version, the search_path and the salt.
2. On a miss the shape itself is rewritten (``rewrite(shape)``): the placeholders come out of the
   deparser as ``$n`` again, wherever the rewrite put them. The result is cut into text fragments
   and placeholder numbers with pglast's scanner (so a ``$1`` inside a string is not one).
3. On a hit, the statement's own constant texts are read back from it: the shape's text between
   placeholders must match the statement exactly, and each constant must be one whole token of a
   kind listed below, read with a lexer-faithful regex. They are spliced into the rewritten
   shape's placeholders; a negative number is wrapped in parentheses (``- 5`` is one constant).

Where this cannot be shown to be exact it falls back to the direct rewrite, for that request
(the constant is not a plain one) or for the shape (never cached again):

- constants other than unsigned / negative decimal numbers, '...' strings, E'...', B'...',
  X'...', dollar-quoted strings, TRUE, FALSE and NULL: U&'...' (UESCAPE), N'...' (libpg_query
  normalises it to ``N$1``, an identifier), 0x1F / 1_000 (newer numeric forms), a string
  continued on the next line, a string followed by a comment, LIMIT ALL (``ALL`` is replaced by
  a placeholder), ``- -5`` (normalised to ``$35``);
- a constant glued to the text before it: only whitespace, ``( , [ = < >`` (and
  ``+ - * / % ^ |`` before an unsigned constant) may precede it, and a negative one not after
  operator characters that would take its minus (``@-5`` is the operator ``@-``, ``=--5`` a
  comment); in the rewritten shape only whitespace, ``( , [ = < >`` may precede a placeholder and
  only whitespace, ``) , ] ;`` or ``::`` follow it;
- a statement whose own ``$n`` parameters are numbered differently from the cached shape's
  (the shape's text does not match it);
- for the whole shape: a row filter containing ``$`` (its parameters would be indistinguishable
  from the placeholders), several statements in one text, a shape that does not parse or
  rewrite, a placeholder the rewrite dropped, repeated or introduced, statements over 20,000
  characters.

Every shape is also checked once against the direct rewrite: the first request that can use an
entry gets both, and the entry is used only if they parse to the same tree; otherwise the shape is
marked as uncacheable.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pglast.parser import ParseError, normalize, parse_sql, scan, split

from sqlproxy.sql.catalog import Catalog
from sqlproxy.sql.model import TableName
from sqlproxy.sql.rewrite import RelationRewrite, rewrite

log = logging.getLogger(__name__)

_WS = " \t\n\r\f"
# May precede a constant in the statement without the lexer joining them into another token.
_BEFORE_ANY = frozenset(_WS + "(,[=<>")
_BEFORE_UNSIGNED = _BEFORE_ANY | frozenset("+-*/%^|")
# May follow a placeholder in the rewritten text (":" only as "::").
_AFTER_SLOT = frozenset(_WS + "),];:")
_OP_CHARS = frozenset("~!@#^&|`?+-*/%<>=")
_OP_KEEPS_MINUS = frozenset("~!@#^&|`?%")

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_LITERAL = re.compile(
    rf"""
    (?P<neg>-[ \t\n\r\f]*(?={_NUMBER}))?
    (?:
        (?P<num>{_NUMBER})
      | (?P<quoted>'(?:[^']|'')*'|[eE]'(?:[^'\\]|\\.|'')*'|[bB]'[^']*'|[xX]'[^']*')
      | (?P<dollar>\$(?P<tag>(?:[A-Za-z_][A-Za-z_0-9]*)?)\$.*?\$(?P=tag)\$)
      | (?P<word>(?i:true|false|null))
    )
    """,
    re.VERBOSE | re.DOTALL,
)
# After a quoted string: another quote (continuation, or a syntax error) or a comment before one.
_AFTER_QUOTED_BAD = re.compile(r"[ \t\n\r\f]*(?:'|--|/\*)")


def _ident_char(c: str) -> bool:
    return c.isalnum() or c in "_$" or ord(c) > 127


def _glues_to_minus(sql: str, pos: int) -> bool:
    """Whether the operator characters before ``pos`` would take a following "-" into them."""
    start = pos
    while start > 0 and sql[start - 1] in _OP_CHARS:
        start -= 1
    run = sql[start:pos]
    return bool(run) and (run[-1] in "-/" or any(c in _OP_KEEPS_MINUS for c in run))


def _literal_at(sql: str, pos: int) -> tuple[str, int] | None:
    """The constant token starting at ``pos`` (as spliced text) and the position after it."""
    m = _LITERAL.match(sql, pos)
    if m is None:
        return None
    end = m.end()
    nxt = sql[end] if end < len(sql) else ""
    if m.group("quoted") is not None:
        if _AFTER_QUOTED_BAD.match(sql, end):
            return None
    elif nxt and (_ident_char(nxt) or nxt in ".'\""):
        # 5e, 0x1F, 1_000, 1..2, truex, $$a$$b: the lexer would read another token than ours.
        return None
    prev = sql[pos - 1] if pos > 0 else " "
    text = m.group(0)
    if m.group("neg") is not None:
        # The lexer reads "=-" as "=" then "-", but "@-" as one operator and "--" as a comment.
        if prev not in _BEFORE_ANY or _glues_to_minus(sql, pos):
            return None
        return f"({text})", end
    if prev not in _BEFORE_UNSIGNED:
        return None
    return text, end


@dataclass(slots=True)
class _Shape:
    # The normalized statement cut at its placeholders: segments[0] $slots[0] segments[1] ...
    segments: tuple[str, ...]
    slots: tuple[int, ...]
    # The rewritten shape cut at its placeholders: fragments[0] $refs[0] fragments[1] ...
    fragments: tuple[str, ...]
    refs: tuple[int, ...]
    unchanged: bool
    verified: bool = False

    def literals(self, sql: str) -> dict[int, str] | None:
        """The statement's constant per placeholder number, or None if it cannot be read exactly."""
        segs = self.segments
        if not sql.startswith(segs[0]):
            return None
        pos = len(segs[0])
        out: dict[int, str] = {}
        for number, seg in zip(self.slots, segs[1:], strict=True):
            found = _literal_at(sql, pos)
            if found is None:
                return None
            out[number], pos = found
            if not sql.startswith(seg, pos):
                return None
            pos += len(seg)
        return out if pos == len(sql) else None

    def splice(self, literals: Mapping[int, str]) -> str:
        frags = self.fragments
        parts = [frags[0]]
        for number, frag in zip(self.refs, frags[1:], strict=True):
            parts.append(literals[number])
            parts.append(frag)
        return "".join(parts)


_UNCACHEABLE = object()


def _params(text: str) -> list[tuple[int, int, int]]:
    """(start, end exclusive, number) of each $n token in ``text``."""
    return [(t.start, t.end + 1, int(text[t.start + 1 : t.end + 1])) for t in scan(text) if t.name == "PARAM"]


def _cut(text: str, params: Sequence[tuple[int, int, int]]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    pieces: list[str] = []
    numbers: list[int] = []
    pos = 0
    for start, end, number in params:
        pieces.append(text[pos:start])
        numbers.append(number)
        pos = end
    pieces.append(text[pos:])
    return tuple(pieces), tuple(numbers)


def _directives_key(directives: Mapping[TableName, RelationRewrite]) -> tuple[object, ...]:
    return tuple(
        sorted(
            (tn.schema, tn.name, d.row_filter, tuple(sorted((c, k.value) for c, k in d.masks.items())))
            for tn, d in directives.items()
        )
    )


def _same_statement(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return parse_sql(a) == parse_sql(b)  # pglast's node equality ignores locations
    except ParseError:
        return False


class RewriteCache:
    """``rewrite()`` memoized per statement shape; see the module docstring."""

    def __init__(
        self, max_entries: int = 4096, max_chars: int = 8_000_000, max_statement_chars: int = 20_000
    ) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars  # shape texts and rewritten shapes held, all entries together
        self.max_statement_chars = max_statement_chars
        self._entries: OrderedDict[tuple[object, ...], object] = OrderedDict()
        self._sizes: dict[tuple[object, ...], int] = {}
        self._chars = 0
        self.hits = 0
        self.misses = 0
        self.fallbacks = 0

    def clear(self) -> None:
        self._entries.clear()
        self._sizes.clear()
        self._chars = 0

    def __len__(self) -> int:
        return len(self._entries)

    def rewrite(
        self,
        sql: str,
        directives: Mapping[TableName, RelationRewrite],
        catalog: Catalog,
        search_path: Sequence[str],
        mask_salt: str,
    ) -> str:
        """Exactly what ``rewrite(sql, ...)`` returns, or SQL that parses to the same tree."""
        if len(sql) > self.max_statement_chars:
            return self._direct(sql, directives, catalog, search_path, mask_salt)
        try:
            shape = normalize(sql)
        except ParseError:
            return self._direct(sql, directives, catalog, search_path, mask_salt)
        key = (shape, _directives_key(directives), catalog.version, tuple(search_path), mask_salt)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            direct = rewrite(sql, directives, catalog, search_path, mask_salt)
            built = self._build(sql, shape, directives, catalog, search_path, mask_salt)
            self._store(key, built)
            if isinstance(built, _Shape):
                self._verify(key, built, sql, direct)
            return direct
        self._entries.move_to_end(key)
        if not isinstance(entry, _Shape):
            return self._direct(sql, directives, catalog, search_path, mask_salt)
        literals = entry.literals(sql)
        if literals is None:
            return self._direct(sql, directives, catalog, search_path, mask_salt)
        if not entry.verified:
            direct = rewrite(sql, directives, catalog, search_path, mask_salt)
            self._verify(key, entry, sql, direct, literals)
            return direct
        self.hits += 1
        return sql if entry.unchanged else entry.splice(literals)

    # ------------------------------------------------------------------ internals

    def _direct(
        self,
        sql: str,
        directives: Mapping[TableName, RelationRewrite],
        catalog: Catalog,
        search_path: Sequence[str],
        mask_salt: str,
    ) -> str:
        self.fallbacks += 1
        return rewrite(sql, directives, catalog, search_path, mask_salt)

    def _store(self, key: tuple[object, ...], entry: object) -> None:
        shape = key[0]
        assert isinstance(shape, str)
        size = len(shape) + (
            sum(map(len, entry.segments)) + sum(map(len, entry.fragments)) if isinstance(entry, _Shape) else 0
        )
        self._chars += size - self._sizes.get(key, 0)
        self._sizes[key] = size
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries or (
            self._chars > self.max_chars and len(self._entries) > 1
        ):
            old, _ = self._entries.popitem(last=False)
            self._chars -= self._sizes.pop(old)

    def _verify(
        self,
        key: tuple[object, ...],
        entry: _Shape,
        sql: str,
        direct: str,
        literals: Mapping[int, str] | None = None,
    ) -> None:
        """Use the entry only once it has reproduced the direct rewrite of a real statement."""
        if literals is None:
            literals = entry.literals(sql)
            if literals is None:
                return  # cannot be checked with this statement; the next one may
        ours = sql if entry.unchanged else entry.splice(literals)
        if _same_statement(ours, direct):
            entry.verified = True
        else:
            log.warning("rewrite cache: shape %r does not reproduce the direct rewrite; not cached", key[0])
            self._store(key, _UNCACHEABLE)

    @staticmethod
    def _build(
        sql: str,
        shape: str,
        directives: Mapping[TableName, RelationRewrite],
        catalog: Catalog,
        search_path: Sequence[str],
        mask_salt: str,
    ) -> object:
        if any(d.row_filter is not None and "$" in d.row_filter for d in directives.values()):
            return _UNCACHEABLE
        try:
            if len(list(split(shape))) != 1:
                return _UNCACHEABLE
            own = max((n for _, _, n in _params(sql)), default=0)
            slot_params = [p for p in _params(shape) if p[2] > own]
            numbers = [n for _, _, n in slot_params]
            if len(set(numbers)) != len(numbers):
                return _UNCACHEABLE
            segments, slots = _cut(shape, slot_params)
            out = rewrite(shape, directives, catalog, search_path, mask_salt)
            unchanged = out is shape
            out_params = [p for p in _params(out) if p[2] > own]
            refs = [n for _, _, n in out_params]
            if sorted(refs) != sorted(numbers):
                return _UNCACHEABLE  # a placeholder dropped, repeated or introduced
            for start, end, _ in out_params:
                before = out[start - 1] if start > 0 else " "
                after = out[end : end + 2]
                if not unchanged and (
                    before not in _BEFORE_ANY
                    or (after and after[0] not in _AFTER_SLOT)
                    or (after[:1] == ":" and after != "::")
                ):
                    return _UNCACHEABLE
        except Exception:
            return _UNCACHEABLE
        fragments, refs_t = _cut(out, out_params)
        return _Shape(segments, slots, fragments, refs_t, unchanged)


# One cache for the process: RewriteStage instances come and go (one per wire session's Decider),
# and the key holds everything the rewrite depends on.
SHARED = RewriteCache()
