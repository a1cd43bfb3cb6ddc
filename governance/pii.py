"""Detectors for plaintext personal data in free text.

Used as a last line of defence where the system writes text it did not fully
compose itself (audit details, SQL text, file names, log lines): anything that looks
like an e-mail address, a phone number, a national id, an IBAN or a payment card
number is replaced by ``[redacted:<kind>]``. The real protection is structural —
events carry pseudonymous tokens, never identifiers — this only catches mistakes.

Numbers are not people. Two rules keep the detectors off the values the system writes
itself (ε, δ, metrics, thresholds, versions, digests):

- In text, a decimal or scientific literal (``2.993874919966173``, ``1e-05``,
  ``1.2345678901234567e+18``) is taken out before the detectors look: digits that touch
  a decimal point, or an exponent, are not a card, a phone or an id. (A dot that ends a
  sentence does not make a number a decimal: ``card 4111 1111 1111 1111.`` is found.)
- In structured values (:func:`find_pii_in`, :func:`redact_value`), only strings are
  text: an ``int``, ``float`` or ``bool`` is a typed number and is never scanned. Audit
  details, model cards and manifests are scanned this way, so a 16-digit count in a
  detail stays a count.

>>> [k for k, _ in find_pii("epsilon 2.993874919966173, delta 1e-05")]
[]
>>> [k for k, _ in find_pii("paid with 4111 1111 1111 1111.")]
['card']
>>> redact_value({"epsilon": 2.993874919966173, "rows": 4111111111111111, "note": "call +44 20 7946 0958"})
({'epsilon': 2.993874919966173, 'rows': 4111111111111111, 'note': 'call [redacted:phone]'}, 1)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["find_pii", "find_pii_in", "iban_ok", "luhn_ok", "maybe_pii", "redact", "redact_value"]

_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    "card": re.compile(r"\b\d(?:[ -]?\d){12,18}\b"),
    "ssn": re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
    # Separated by spaces, hyphens or parentheses (a leading + allowed); a sentence's full stop may
    # follow. A dotted form only as 3.3.4 (555.123.4567): other dotted runs are versions or addresses.
    "phone": re.compile(
        r"(?<![\w.])(?:\+?\(?\d{1,4}\)?(?:[ -]?\(?\d{2,4}\)?){2,5}|\d{3}\.\d{3}\.\d{4})(?![\w]|\.\d)"
    ),
    # A subject token in free text (e.g. SQL naming one): the append-only audit log would keep it
    # after the subject is erased; events name subjects only in their subject_token column.
    "token": re.compile(r"(?<![A-Za-z0-9])sub_[a-z2-7]{26}(?![a-z2-7])"),
}

# Where two detectors claim the same text, the more specific one names it (an SSN also looks like a phone).
_PRIORITY = {k: i for i, k in enumerate(("token", "email", "ssn", "iban", "card", "phone"))}

# A decimal or scientific literal: digits on both sides of one point, or an exponent. Not part of
# a longer dotted run (1.2.3, 192.168.0.1, 555.123.4567), which stays for the detectors to judge.
_NUMBER = re.compile(r"(?<!\d)(?<!\d\.)\d+(?:\.\d+(?:[eE][+-]?\d+)?|[eE][+-]?\d+)(?!\d|\.\d)")

# Every detector needs an "@", "sub_" or a run of at least nine digits (with separators): a cheap
# first look that lets the common case (policy vocabulary, short numbers) skip the detectors.
_MAYBE = re.compile(r"@|sub_|\d(?:[ ().-]{0,2}\d){8}")


def maybe_pii(text: str) -> bool:
    """A cheap first look: ``False`` means no detector can match anywhere in ``text``."""
    return _MAYBE.search(text) is not None


def luhn_ok(digits: str) -> bool:
    """The Luhn check of a payment card number's digits."""
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def iban_ok(s: str) -> bool:
    """ISO 13616 mod-97 check of a candidate IBAN (spaces allowed)."""
    s = s.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


# A UUID (an identity provider's subject, a request id): random hex in 8-4-4-4-12 groups, whose
# middle groups are all digits about once in two hundred (8959-4266-9415: a "phone"). An identifier
# the system made, never contact data: masked whole before the detectors look.
_UUID = re.compile(r"(?<![0-9A-Za-z-])[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}(?![0-9A-Za-z-])")


def _mask_non_pii(text: str) -> str:
    """``text`` with every decimal/scientific literal's and every UUID's characters replaced by
    ``x`` (same length)."""
    if "-" in text:  # first: a UUID's hex can hold an exponent's shape (7e0)
        text = _UUID.sub(lambda m: "x" * len(m.group(0)), text)
    return _NUMBER.sub(lambda m: "x" * len(m.group(0)), text)


def _spans(text: str) -> Iterator[tuple[int, int, str]]:
    """``(start, end, kind)`` of each span of ``text`` that looks like personal data."""
    if not _MAYBE.search(text):
        return
    masked = _mask_non_pii(text)
    if not _MAYBE.search(masked):
        return
    for kind, pat in _PATTERNS.items():
        for m in pat.finditer(masked):
            s = m.group(0)
            if kind in ("card", "phone", "ssn"):
                digits = re.sub(r"\D", "", s)
                if kind == "card" and not luhn_ok(digits):
                    continue
                if kind == "phone" and (len(digits) < 9 or len(digits) > 15 or not re.search(r"[-+ ().]", s)):
                    continue  # plain numbers (counts, epochs, ids of runs) are not phone numbers
            elif kind == "iban" and not iban_ok(s):
                continue
            yield m.start(), m.end(), kind


def find_pii(text: str) -> Iterator[tuple[str, str]]:
    """Yield ``(kind, match)`` for each span of free ``text`` that looks like personal data."""
    for start, end, kind in _spans(text):
        yield kind, text[start:end]


def redact(text: str) -> tuple[str, int]:
    """Replace every detected span with ``[redacted:<kind>]``; return the text and the count.

    Spans are replaced where they were found, so the same digits elsewhere (inside a decimal,
    say) are left alone.
    """
    spans = sorted(_spans(text), key=lambda s: (s[0], _PRIORITY[s[2]]))
    if not spans:
        return text, 0
    out, pos, count = [], 0, 0
    for start, end, kind in spans:
        if start < pos:  # overlaps a span already replaced (e.g. an e-mail's digits as a phone)
            continue
        out.append(text[pos:start])
        out.append(f"[redacted:{kind}]")
        pos, count = end, count + 1
    out.append(text[pos:])
    return "".join(out), count


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or type(value).__name__ in ("Decimal", "float64", "int64", "float32", "int32")


def find_pii_in(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Yield ``(field path, kind)`` for each string inside ``value`` that looks like personal data.

    ``value`` is a JSON-like structure: mappings (keys are text too), lists, tuples and sets
    are walked; numbers, booleans and ``None`` are typed values and never scanned; anything
    else is scanned as ``str(value)``. The matched text is not returned: callers name the
    field, never the value.
    """
    if value is None or isinstance(value, bool) or _is_number(value):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(k, str):
                for kind, _ in find_pii(k):
                    yield (f"{path}.<key>" if path else "<key>"), kind  # the key is the value here: not echoed
                    sub = f"{path}.<key>" if path else "<key>"
            yield from find_pii_in(v, sub)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            yield from find_pii_in(v, f"{path}[{i}]")
    else:
        for kind, _ in find_pii(value if isinstance(value, str) else str(value)):
            yield path, kind


def redact_value(value: Any) -> tuple[Any, int]:
    """``value`` with every string inside it redacted (see :func:`redact`), and the count.

    Mappings, lists and tuples keep their shape (tuples and sets become lists, as in JSON);
    numbers, booleans and ``None`` are returned as they are; any other object becomes its
    redacted ``str``.
    """
    if value is None or isinstance(value, bool) or _is_number(value):
        return value, 0
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        total = 0
        for k, v in value.items():
            if isinstance(k, str):
                k, n = redact(k)
                total += n
            out[k], n = redact_value(v)
            total += n
        return out, total
    if isinstance(value, (list, tuple, set, frozenset)):
        items, total = [], 0
        for v in value:
            r, n = redact_value(v)
            items.append(r)
            total += n
        return items, total
    return redact(str(value))
