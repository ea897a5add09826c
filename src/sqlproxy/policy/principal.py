"""Who is asking: the part of an authenticated identity the policy engine reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

AttributeValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user as the policy sees it.

    ``attributes`` feed ``{user.NAME}`` placeholders in row filters. ``admin`` grants the admin
    HTTP endpoints only: it gives no SQL rights of its own (those come from policy rules), so the
    policy engine does not read it.
    """

    name: str
    roles: frozenset[str] = frozenset()
    attributes: Mapping[str, AttributeValue] = field(default_factory=lambda: MappingProxyType({}))
    admin: bool = False
