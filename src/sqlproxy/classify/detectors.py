"""Value detectors: does one result cell look like a piece of PII?

A detector judges a whole value (the cell *is* an e-mail address), not text that merely contains
one: result columns are classified as a unit, and whole-value matching keeps the false-positive
rate low enough that a label means something. Only ``str`` cells are inspected (plus ``ipaddress``
objects, which is how asyncpg decodes ``inet``): numbers, dates and bytes are never PII by shape
alone, and looking at them would label every id or order total as a phone number.

The registry is open: ``DetectorRegistry.register`` adds a detector for a new label.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

EMAIL = "PII.Email"
PHONE = "PII.Phone"
SSN = "PII.SSN"
CREDIT_CARD = "PII.CreditCard"
IP_ADDRESS = "PII.IPAddress"


@runtime_checkable
class Detector(Protocol):
    """Anything with a label and a ``matches`` predicate over one cell value."""

    @property
    def label(self) -> str: ...

    def matches(self, value: object) -> bool: ...


@dataclass(frozen=True, slots=True)
class RegexDetector:
    """A precompiled pattern that must match the whole (stripped) string, then a validator.

    ``min_len``/``max_len`` bound the stripped length before the regex runs, and ``prefilter`` is
    a cheap test on the stripped string: classification runs on every result, and most cells are
    rejected by these alone. The length bound also caps the work any backtracking can do.
    """

    label: str
    pattern: re.Pattern[str]
    validate: Callable[[re.Match[str]], bool] | None = None
    min_len: int = 1
    max_len: int = 64
    prefilter: Callable[[str], bool] | None = None

    def matches(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        s = value.strip()
        if not self.min_len <= len(s) <= self.max_len:
            return False
        if self.prefilter is not None and not self.prefilter(s):
            return False
        m = self.pattern.fullmatch(s)
        if m is None:
            return False
        return self.validate is None or self.validate(m)


# -- e-mail ------------------------------------------------------------------------------------

# The dot-atom form of RFC 5322 for the local part (no quoted strings, no comments: those are
# legal but never seen in data, and allowing them makes the pattern match prose). The domain must
# be a host name with at least two labels and an alphabetic (or punycode) top-level label, which
# keeps "a@b" and "user@localhost" out.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL_RE = re.compile(
    rf"(?P<local>{_ATEXT}+(?:\.{_ATEXT}+)*)@(?P<domain>(?:{_LABEL}\.)+(?:[A-Za-z]{{2,63}}|xn--[A-Za-z0-9-]{{1,59}}))"
)


def _valid_email(m: re.Match[str]) -> bool:
    # RFC 5321 limits: 64 octets of local part, 253 of domain.
    return len(m.group("local")) <= 64 and len(m.group("domain")) <= 253


# -- phone -------------------------------------------------------------------------------------

# Three shapes, each needing something a plain number does not have (a "+", a separator or
# parentheses), so ids, totals and bare digit strings never match:
#   international: "+" country code, then digit groups with optional single separators and at
#     most one parenthesised group: +14155552671, +44 20 7946 0958, +1 (555) 123-4567;
#   NANP: (555) 123-4567, 555-123-4567, 555.123.4567, 555 123 4567, 1-555-123-4567;
#   national with a trunk 0 and space-separated groups: 020 7946 0958, 01 23 45 67 89,
#     (030) 1234 5678. Dashes are left out of this shape because 0NN-NN-NNNN would then also
#     read as an SSN-like identifier.
_PHONE_RE = re.compile(
    r"(?P<intl>\+[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,6})"
    r"|(?P<nanp>(?:1[ .-]?)?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])\d{3}[ .-]\d{4})"
    r"|(?P<natl>(?:\(0\d{1,4}\)|0\d{1,4})(?: \d{2,8}){1,4})",
    re.ASCII,  # without it \d also matches Arabic-Indic and other Unicode digits
)
# Dates in the common numeric layouts. The phone shapes above already exclude the dates we know
# of (too few digits, wrong grouping); this keeps the "never a date" promise if they are loosened.
_YMD_RE = re.compile(
    r"(?P<y>\d{4})(?P<sep>[-/. ])(?P<m>\d{1,2})(?P=sep)(?P<d>\d{1,2})(?:[ T]\d{1,2}:\d{2}.*)?", re.ASCII
)
_DMY_RE = re.compile(
    r"(?P<a>\d{1,2})(?P<sep>[-/. ])(?P<b>\d{1,2})(?P=sep)(?P<y>\d{2}|\d{4})(?:[ T]\d{1,2}:\d{2}.*)?", re.ASCII
)
# "+1234567.89": a signed decimal, not a dotted phone number.
_SIGNED_DECIMAL_RE = re.compile(r"\+\d+\.\d+", re.ASCII)


def _looks_like_date(text: str) -> bool:
    m = _YMD_RE.fullmatch(text)
    if m is not None:
        return 1 <= int(m.group("m")) <= 12 and 1 <= int(m.group("d")) <= 31
    m = _DMY_RE.fullmatch(text)
    if m is not None:
        a, b = int(m.group("a")), int(m.group("b"))
        # Day-month or month-day: either order is a date when both fit.
        return 1 <= a <= 31 and 1 <= b <= 31 and (a <= 12 or b <= 12)
    return False


def _valid_phone(m: re.Match[str]) -> bool:
    text = m.group(0)
    if _looks_like_date(text) or _SIGNED_DECIMAL_RE.fullmatch(text):
        return False
    digits = sum(c.isdigit() for c in text)
    if m.group("intl") is not None:
        return 8 <= digits <= 15  # E.164 allows at most 15 digits including the country code
    if m.group("nanp") is not None:
        return digits == 10 or (digits == 11 and text.startswith("1"))
    return 9 <= digits <= 12


# -- SSN ---------------------------------------------------------------------------------------

_SSN_RE = re.compile(r"(?P<area>\d{3})-(?P<group>\d{2})-(?P<serial>\d{4})", re.ASCII)


def _valid_ssn(m: re.Match[str]) -> bool:
    # The SSA never issues area 000, 666 or 900-999, group 00 or serial 0000.
    area = m.group("area")
    return (
        area != "000"
        and area != "666"
        and not area.startswith("9")
        and m.group("group") != "00"
        and m.group("serial") != "0000"
    )


# -- credit card -------------------------------------------------------------------------------

_CARD_RE = re.compile(r"\d(?:[ -]?\d){12,18}", re.ASCII)


def luhn_valid(digits: str) -> bool:
    """The Luhn mod-10 check over a string of ASCII digits (the check digit last)."""
    if not digits or not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# (first-digits range, allowed lengths). Only networks that issue cards to people: a Luhn-valid
# number in a range no network uses is far more likely an id than a card.
_IIN_TABLE: tuple[tuple[int, int, int, frozenset[int]], ...] = (
    # (prefix length, low, high, lengths)
    (1, 4, 4, frozenset({13, 16, 19})),  # Visa
    (2, 51, 55, frozenset({16})),  # Mastercard
    (4, 2221, 2720, frozenset({16})),  # Mastercard 2-series
    (2, 34, 34, frozenset({15})),  # American Express
    (2, 37, 37, frozenset({15})),
    (4, 6011, 6011, frozenset({16, 17, 18, 19})),  # Discover
    (3, 644, 649, frozenset({16, 17, 18, 19})),
    (2, 65, 65, frozenset({16, 17, 18, 19})),
    (3, 300, 305, frozenset({14, 15, 16, 17, 18, 19})),  # Diners Club
    (2, 36, 36, frozenset({14, 15, 16, 17, 18, 19})),
    (2, 38, 39, frozenset({16, 17, 18, 19})),
    (4, 3528, 3589, frozenset({16, 17, 18, 19})),  # JCB
    (2, 62, 62, frozenset({16, 17, 18, 19})),  # UnionPay
    (2, 50, 50, frozenset({13, 14, 15, 16, 17, 18, 19})),  # Maestro
    (2, 56, 58, frozenset({13, 14, 15, 16, 17, 18, 19})),
    (2, 67, 67, frozenset({13, 14, 15, 16, 17, 18, 19})),
)


# The table as 4-digit ranges per length (a 2-digit range 51-55 is 5100-5599), for one lookup.
_IIN_BY_LENGTH: dict[int, tuple[tuple[int, int], ...]] = {
    n: tuple(
        (low * 10 ** (4 - plen), (high + 1) * 10 ** (4 - plen))
        for plen, low, high, lengths in _IIN_TABLE
        if n in lengths
    )
    for n in range(13, 20)
}


def known_iin(digits: str) -> bool:
    """Whether a digit string has the prefix and length of a card network's numbers."""
    ranges = _IIN_BY_LENGTH.get(len(digits))
    if not ranges or not digits.isascii() or not digits.isdigit():
        return False
    head = int(digits[:4])
    return any(low <= head < high for low, high in ranges)


def _valid_card(m: re.Match[str]) -> bool:
    text = m.group(0)
    # "4111 1111-1111 1111" is not how anyone writes a card number; mixed separators are more
    # likely some other composite identifier.
    if " " in text and "-" in text:
        return False
    digits = text.replace(" ", "").replace("-", "")
    return known_iin(digits) and luhn_valid(digits)


# -- IP address --------------------------------------------------------------------------------

_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)
_NETWORK_TYPES = (ipaddress.IPv4Network, ipaddress.IPv6Network)
# Hex digits, separators, and the letters of a zone id ("fe80::1%eth0").
_IP_CHARS = re.compile(r"[0-9A-Za-z.:/%_-]{2,100}")


@dataclass(frozen=True, slots=True)
class IPAddressDetector:
    """IPv4 and IPv6 addresses: ``ipaddress`` objects as asyncpg returns ``inet`` values, and
    strings in canonical text form (with an optional prefix length, as ``inet::text`` prints).
    A network (``cidr``) counts only when it is a single host: a /24 identifies nobody."""

    label: str = IP_ADDRESS

    def matches(self, value: object) -> bool:
        if isinstance(value, _ADDRESS_TYPES):
            # IPv4Interface/IPv6Interface subclass the address types.
            return True
        if isinstance(value, _NETWORK_TYPES):
            return value.num_addresses == 1
        if not isinstance(value, str):
            return False
        s = value.strip()
        if ("." not in s and ":" not in s) or not _IP_CHARS.fullmatch(s):
            return False
        try:
            if "/" in s:
                iface = ipaddress.ip_interface(s)
                # "10.0.0.0/8" written as a network is a range, not somebody's address.
                return iface.ip != iface.network.network_address or iface.network.num_addresses == 1
            ipaddress.ip_address(s)
        except ValueError:
            return False
        return True


# -- registry ----------------------------------------------------------------------------------


def default_detectors() -> tuple[Detector, ...]:
    return (
        RegexDetector(EMAIL, _EMAIL_RE, _valid_email, 6, 254, lambda s: "@" in s),
        RegexDetector(
            PHONE, _PHONE_RE, _valid_phone, 9, 32, lambda s: s[0] in "+(0123456789" and s[-1].isdigit()
        ),
        RegexDetector(SSN, _SSN_RE, _valid_ssn, 11, 11, lambda s: s[3] == "-"),
        # Every network in the IIN table starts with 2, 3, 4, 5 or 6.
        RegexDetector(
            CREDIT_CARD, _CARD_RE, _valid_card, 13, 37, lambda s: s[0] in "23456" and s[-1].isdigit()
        ),
        IPAddressDetector(),
    )


@dataclass(slots=True)
class DetectorRegistry:
    """An ordered set of detectors. Several may share a label (two shapes of one class)."""

    _detectors: list[Detector] = field(default_factory=list)

    @classmethod
    def default(cls) -> DetectorRegistry:
        return cls(list(default_detectors()))

    def register(self, detector: Detector) -> None:
        self._detectors.append(detector)

    def __iter__(self) -> Iterator[Detector]:
        return iter(self._detectors)

    def __len__(self) -> int:
        return len(self._detectors)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted({d.label for d in self._detectors}))

    def detect(self, value: object) -> frozenset[str]:
        """Every label whose detector matches ``value``."""
        return frozenset(d.label for d in self._detectors if d.matches(value))


_DEFAULTS = default_detectors()


def detect(value: object, detectors: Iterable[Detector] | None = None) -> frozenset[str]:
    """Labels the default (or given) detectors find in one value."""
    ds = _DEFAULTS if detectors is None else detectors
    return frozenset(d.label for d in ds if d.matches(value))
