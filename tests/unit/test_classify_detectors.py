import datetime
import ipaddress
from dataclasses import dataclass
from decimal import Decimal

import pytest

from sqlproxy.classify.detectors import (
    CREDIT_CARD,
    EMAIL,
    IP_ADDRESS,
    PHONE,
    SSN,
    DetectorRegistry,
    RegexDetector,
    detect,
    known_iin,
    luhn_valid,
)

ARABIC_INDIC = str.maketrans("0123456789", "".join(chr(0x660 + i) for i in range(10)))

# (value, expected labels). One table so the cross-detector picture is visible: a value must get
# exactly its own label, not a neighbour's too.
CASES: list[tuple[object, frozenset[str]]] = [
    # e-mail
    ("alice@example.com", frozenset({EMAIL})),
    ("  Bob.Smith+tag@mail.example.co.uk ", frozenset({EMAIL})),
    ("o'brien@example.ie", frozenset({EMAIL})),
    ("user@xn--bcher-kva.example", frozenset({EMAIL})),
    ("user@localhost", frozenset()),
    ("a@b", frozenset()),
    ("@example.com", frozenset()),
    ("alice@", frozenset()),
    ("alice.@example.com", frozenset()),
    ("al..ice@example.com", frozenset()),
    ("alice@-example.com", frozenset()),
    ("alice@example.c0m", frozenset()),
    ("contact alice@example.com today", frozenset()),
    ("alice@example.com, bob@example.com", frozenset()),
    ("x" * 65 + "@example.com", frozenset()),
    # phone
    ("+14155552671", frozenset({PHONE})),
    ("+44 20 7946 0958", frozenset({PHONE})),
    ("+1 (555) 123-4567", frozenset({PHONE})),
    ("+44 (0) 20 7946 0958", frozenset({PHONE})),
    ("(555) 123-4567", frozenset({PHONE})),
    ("(555)123-4567", frozenset({PHONE})),
    ("555-123-4567", frozenset({PHONE})),
    ("555.123.4567", frozenset({PHONE})),
    ("555 123 4567", frozenset({PHONE})),
    ("1-555-123-4567", frozenset({PHONE})),
    ("020 7946 0958", frozenset({PHONE})),
    ("01 23 45 67 89", frozenset({PHONE})),
    ("(030) 1234 5678", frozenset({PHONE})),
    ("5551234567", frozenset()),  # a bare digit string: an id as easily as a phone
    ("12345", frozenset()),
    ("1234.56", frozenset()),
    ("+1234567.89", frozenset()),  # a signed amount
    ("+1234", frozenset()),  # too few digits for any number plan
    ("+1234567890123456", frozenset()),  # more than E.164's 15 digits
    ("155-123-4567", frozenset()),  # NANP area codes do not start with 1
    ("2023-01-15", frozenset()),
    ("01/15/2023", frozenset()),
    ("15.01.2023", frozenset()),
    ("01 02 2023", frozenset()),
    ("2023-01-15 10:20:30", frozenset()),
    ("ORD-2023-0001", frozenset()),
    # SSN
    ("123-45-6789", frozenset({SSN})),
    ("078-05-1120", frozenset({SSN})),
    ("000-12-3456", frozenset()),
    ("666-12-3456", frozenset()),
    ("900-12-3456", frozenset()),
    ("999-12-3456", frozenset()),
    ("123-00-4567", frozenset()),
    ("123-45-0000", frozenset()),
    ("123456789", frozenset()),
    ("123-456-789", frozenset()),
    # credit card
    ("4111111111111111", frozenset({CREDIT_CARD})),  # Visa
    ("4111 1111 1111 1111", frozenset({CREDIT_CARD})),
    ("4111-1111-1111-1111", frozenset({CREDIT_CARD})),
    ("5555555555554444", frozenset({CREDIT_CARD})),  # Mastercard
    ("2223003122003222", frozenset({CREDIT_CARD})),  # Mastercard 2-series
    ("378282246310005", frozenset({CREDIT_CARD})),  # Amex, 15 digits
    ("3782 822463 10005", frozenset({CREDIT_CARD})),
    ("6011111111111117", frozenset({CREDIT_CARD})),  # Discover
    ("3530111333300000", frozenset({CREDIT_CARD})),  # JCB
    ("30569309025904", frozenset({CREDIT_CARD})),  # Diners, 14 digits
    ("4222222222222", frozenset({CREDIT_CARD})),  # Visa, 13 digits
    ("4111111111111112", frozenset()),  # Luhn fails
    ("1111111111111117", frozenset()),  # Luhn holds, but no network issues 1...
    ("9999999999999995", frozenset()),  # Luhn holds, 9... is not a card network
    ("41111111111111111", frozenset()),  # Visa has no 17-digit numbers
    ("4111 1111-1111 1111", frozenset()),  # mixed separators
    ("4111  1111 1111 1111", frozenset()),  # double separator
    ("411111111111", frozenset()),  # 12 digits
    # IP addresses
    ("192.168.1.10", frozenset({IP_ADDRESS})),
    ("10.0.0.1/24", frozenset({IP_ADDRESS})),  # inet::text of a host with its netmask
    ("2001:db8::1", frozenset({IP_ADDRESS})),
    ("::ffff:192.0.2.1", frozenset({IP_ADDRESS})),
    ("fe80::1%eth0", frozenset({IP_ADDRESS})),
    ("10.0.0.0/8", frozenset()),  # a network, not anyone's address
    ("256.1.1.1", frozenset()),
    ("1.2.3", frozenset()),
    ("01.2.3.4", frozenset()),
    ("12:30", frozenset()),
    ("std::vector", frozenset()),
    # Arabic-Indic digits are digits to Python's \d and int(), but no system issues these.
    ("123-45-6789".translate(ARABIC_INDIC), frozenset()),
    ("4111111111111111".translate(ARABIC_INDIC), frozenset()),
    ("555-123-4567".translate(ARABIC_INDIC), frozenset()),
    # not strings at all
    (None, frozenset()),
    (5551234567, frozenset()),
    (4111111111111111, frozenset()),
    (Decimal("4111111111111111"), frozenset()),
    (datetime.date(2023, 1, 15), frozenset()),
    (b"alice@example.com", frozenset()),
    (["alice@example.com"], frozenset()),
    # objects asyncpg gives for inet / cidr
    (ipaddress.IPv4Address("192.0.2.7"), frozenset({IP_ADDRESS})),
    (ipaddress.IPv6Address("2001:db8::7"), frozenset({IP_ADDRESS})),
    (ipaddress.IPv4Interface("192.0.2.7/24"), frozenset({IP_ADDRESS})),
    (ipaddress.IPv6Interface("2001:db8::7/64"), frozenset({IP_ADDRESS})),
    (ipaddress.IPv4Network("192.0.2.7/32"), frozenset({IP_ADDRESS})),
    (ipaddress.IPv4Network("192.0.2.0/24"), frozenset()),
    # plain text
    ("", frozenset()),
    ("   ", frozenset()),
    ("hello world", frozenset()),
    ("x" * 100_000, frozenset()),
]


@pytest.mark.parametrize(("value", "expected"), CASES, ids=[repr(v)[:40] for v, _ in CASES])
def test_default_detectors(value: object, expected: frozenset[str]) -> None:
    assert detect(value) == expected


@pytest.mark.parametrize(
    ("digits", "ok"),
    [
        ("0", True),
        ("18", True),  # 1*2=2, +8 = 10
        ("59", True),  # 5*2=10 -> 1, +9 = 10: the "subtract 9" branch
        ("91", True),  # 9*2=18 -> 9, +1 = 10
        ("4111111111111111", True),
        ("4111111111111121", False),
        ("79927398713", True),  # the textbook example
        ("79927398710", False),
        ("", False),
        ("12a4", False),
        ("٣٤", False),  # Arabic-Indic digits are digits to str.isdigit, not to Luhn
    ],
)
def test_luhn(digits: str, ok: bool) -> None:
    assert luhn_valid(digits) is ok


def test_luhn_catches_every_single_digit_error() -> None:
    number = "4539578763621486"
    assert luhn_valid(number)
    for i in range(len(number)):
        for d in "0123456789":
            if d != number[i]:
                assert not luhn_valid(number[:i] + d + number[i + 1 :]), (i, d)


def test_luhn_catches_adjacent_transposition() -> None:
    number = "4539578763621486"
    for i in range(len(number) - 1):
        a, b = number[i], number[i + 1]
        # 0<->9 is the one swap Luhn cannot see.
        if a != b and {a, b} != {"0", "9"}:
            assert not luhn_valid(number[:i] + b + a + number[i + 2 :]), i


def test_known_iin_needs_prefix_and_length() -> None:
    assert known_iin("4" * 16)
    assert not known_iin("4" * 15)
    assert known_iin("34" + "0" * 13)
    assert not known_iin("34" + "0" * 14)
    assert known_iin("2720" + "0" * 12)
    assert not known_iin("2721" + "0" * 12)


def test_registry_is_extensible() -> None:
    import re

    reg = DetectorRegistry.default()
    before = len(reg)

    @dataclass(frozen=True)
    class Iban:
        label: str = "PII.IBAN"

        def matches(self, value: object) -> bool:
            return isinstance(value, str) and value.replace(" ", "").startswith("GB82WEST")

    reg.register(Iban())
    reg.register(RegexDetector("Internal.EmployeeId", re.compile(r"EMP-\d{6}")))
    assert len(reg) == before + 2
    assert reg.detect("GB82 WEST 1234 5698 7654 32") == {"PII.IBAN"}
    assert reg.detect("EMP-004211") == {"Internal.EmployeeId"}
    assert reg.detect("alice@example.com") == {EMAIL}
    assert "PII.IBAN" in reg.labels and "Internal.EmployeeId" in reg.labels
    assert reg.labels == tuple(sorted(reg.labels))
