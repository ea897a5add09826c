"""Checking an audit chain: every record's HMAC, every link, the seq sequence, and the head.

Verification streams: memory does not grow with the number of records. Each problem names the
seq where it shows and what kind it is:

- ``modified``: the record's HMAC does not match its content (changed or forged).
- ``deleted``: seqs missing between two records, or before the first one when the chain must
  start at genesis.
- ``duplicate``: a seq seen twice in a row (a copied or inserted record).
- ``reordered``: a seq lower than one already seen.
- ``broken_link``: consecutive seqs whose ``prev_hash`` does not match the previous ``hash``
  (a record replaced or inserted with renumbering).
- ``truncated``: the head says the chain goes further than the records do.
- ``beyond_head``: records after the head's seq.
- ``head_mismatch``: the record at the head's seq is not the one the head names.
- ``malformed``: a line or row that cannot be read as a record.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from sqlproxy.audit.chain import ChainState, compute_hash
from sqlproxy.audit.record import GENESIS_HASH, AuditRecord, Undecodable
from sqlproxy.audit.sinks import AuditStore, all_jsonl_files


class ProblemKind(StrEnum):
    MODIFIED = "modified"
    DELETED = "deleted"
    DUPLICATE = "duplicate"
    REORDERED = "reordered"
    BROKEN_LINK = "broken_link"
    TRUNCATED = "truncated"
    BEYOND_HEAD = "beyond_head"
    HEAD_MISMATCH = "head_mismatch"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class Problem:
    seq: int | None
    kind: ProblemKind
    detail: str


@dataclass(slots=True)
class VerifyReport:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds(self) -> set[ProblemKind]:
        return {p.kind for p in self.problems}

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "problems": [{"seq": p.seq, "kind": str(p.kind), "detail": p.detail} for p in self.problems],
        }


class ChainVerifier:
    """Feed records in stored order, then ``finish``.

    ``require_genesis``: the first record must be seq 1 linked to the zero hash. Off for a
    JSONL set whose oldest files may have been rotated away; the report's ``first_seq`` then
    says where the checked part starts.
    """

    def __init__(self, key: bytes, *, require_genesis: bool = True) -> None:
        self._key = key
        self._require_genesis = require_genesis
        self._prev: AuditRecord | None = None  # the highest-seq record so far
        self.report = VerifyReport()

    def _add(self, seq: int | None, kind: ProblemKind, detail: str) -> None:
        self.report.problems.append(Problem(seq, kind, detail))

    def feed(self, item: AuditRecord | Undecodable) -> None:
        if isinstance(item, Undecodable):
            self._add(item.seq, ProblemKind.MALFORMED, f"{item.location}: {item.error}")
            return
        r = item
        rep = self.report
        rep.records += 1
        if rep.first_seq is None:
            rep.first_seq = r.seq
        try:
            expected = compute_hash(self._key, r)
        except (ValueError, TypeError, UnicodeError) as e:
            self._add(r.seq, ProblemKind.MALFORMED, f"cannot hash record: {e}")
            expected = ""
        if expected and not hmac.compare_digest(expected, r.hash):
            self._add(r.seq, ProblemKind.MODIFIED, "HMAC does not match the record's content")

        prev = self._prev
        if prev is None:
            if self._require_genesis:
                if r.seq > 1:
                    self._add(
                        r.seq, ProblemKind.DELETED, f"seq 1..{r.seq - 1} missing before the first record"
                    )
                elif r.seq == 1 and r.prev_hash != GENESIS_HASH:
                    self._add(r.seq, ProblemKind.BROKEN_LINK, "first record does not link to the zero hash")
                elif r.seq < 1:
                    self._add(r.seq, ProblemKind.MALFORMED, "seq below 1")
            self._prev = r
            return

        if r.seq == prev.seq + 1:
            if r.prev_hash != prev.hash:
                self._add(
                    r.seq, ProblemKind.BROKEN_LINK, f"prev_hash does not match the hash of seq {prev.seq}"
                )
        elif r.seq > prev.seq + 1:
            lo, hi = prev.seq + 1, r.seq - 1
            self._add(lo, ProblemKind.DELETED, f"seq {lo}..{hi} missing" if hi > lo else f"seq {lo} missing")
        elif r.seq == prev.seq:
            self._add(r.seq, ProblemKind.DUPLICATE, f"seq {r.seq} appears again")
        else:
            self._add(r.seq, ProblemKind.REORDERED, f"seq {r.seq} appears after seq {prev.seq}")
        if r.seq > prev.seq:
            self._prev = r

    def finish(self, head: ChainState | None = None) -> VerifyReport:
        rep = self.report
        last = self._prev
        rep.last_seq = None if last is None else last.seq
        if head is not None:
            last_seq = 0 if last is None else last.seq
            if last_seq < head.seq:
                self._add(
                    last_seq + 1,
                    ProblemKind.TRUNCATED,
                    f"head is at seq {head.seq} but the records end at {last_seq}",
                )
            elif last_seq > head.seq:
                self._add(
                    head.seq + 1,
                    ProblemKind.BEYOND_HEAD,
                    f"records continue to seq {last_seq} past the head at {head.seq}",
                )
            elif last is not None and last.hash != head.head_hash:
                self._add(
                    last.seq, ProblemKind.HEAD_MISMATCH, "head hash differs from the last record's hash"
                )
        return rep


def verify(
    records: Iterable[AuditRecord | Undecodable],
    key: bytes,
    head: ChainState | None = None,
    *,
    require_genesis: bool = True,
) -> VerifyReport:
    v = ChainVerifier(key, require_genesis=require_genesis)
    for r in records:
        v.feed(r)
    return v.finish(head)


async def verify_store(store: AuditStore, key: bytes, *, page: int = 1000) -> VerifyReport:
    """The whole store, checked against its own chain head row."""
    v = ChainVerifier(key, require_genesis=True)
    after = 0
    while True:
        items = await store.scan(after, page)
        if not items:
            break
        for it in items:
            v.feed(it)
        last_seq = items[-1].seq
        if last_seq is None:  # cannot happen for rows keyed by seq; stop rather than loop
            break
        after = last_seq
    return v.finish(await store.head())


def read_jsonl(path: Path | str) -> Iterator[AuditRecord | Undecodable]:
    """Every record of a JSONL file set (rotated files oldest first, then the live file)."""
    for p in all_jsonl_files(path):
        with open(p, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    yield AuditRecord.from_json(raw)
                except (ValueError, TypeError) as e:
                    seq: int | None = None
                    try:
                        s = json.loads(raw).get("seq")
                        seq = s if isinstance(s, int) else None
                    except (ValueError, AttributeError):
                        pass
                    yield Undecodable(seq, f"{p.name}:{n}", str(e))


def verify_jsonl(
    path: Path | str,
    key: bytes,
    head: ChainState | None = None,
    *,
    require_genesis: bool = False,
) -> VerifyReport:
    """A JSONL file set. The files carry no head of their own: pass the store's head to detect
    truncation at the end, and ``require_genesis=True`` when no file has been rotated away.
    Blocking; run it in a thread from async code."""
    return verify(read_jsonl(path), key, head, require_genesis=require_genesis)
