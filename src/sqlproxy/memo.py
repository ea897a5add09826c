"""Values worked out once per object and reused while that very object comes back.

The analysis cache hands the same Analysis object to every statement of one shape, an identity
object stands for its user until a reload, records of one shape share their lists: what is
derived from such an object (audit parts, a principal, a classification, session effects, a
record's table names) is kept per object. Keyed by ``id()``; each entry holds its object, so an
id is never mistaken for another object's after the first is gone.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class IdMemo(Generic[K, V]):
    __slots__ = ("_entries", "maxsize")

    def __init__(self, maxsize: int = 4096) -> None:
        self.maxsize = maxsize
        self._entries: dict[int, tuple[K, V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, obj: K) -> V | None:
        hit = self._entries.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        return None

    def put(self, obj: K, value: V) -> V:
        """Keep ``value`` for ``obj`` and return it. When full, everything is dropped: the
        objects in use come back and are worked out again."""
        if len(self._entries) >= self.maxsize:
            self._entries.clear()
        self._entries[id(obj)] = (obj, value)
        return value
