"""Detectors for plaintext personal data in free text.

Used as a last line of defence where the system writes text it did not fully
compose itself (audit details, log lines): anything that looks like an e-mail
address, a phone number, a national id or a payment card number is replaced by
``[redacted:<kind>]``. The real protection is structural — events carry
pseudonymous tokens, never identifiers — this only catches mistakes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    "card": re.compile(r"\b\d(?:[ -]?\d){12,18}\b"),
    "ssn": re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
    "phone": re.compile(r"(?<![\w.])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{2,4}\)?){2,5}(?![\w.])"),
    # A subject token in free text (e.g. SQL naming one): the append-only audit log would keep it
    # after the subject is erased; events name subjects only in their subject_token column.
    "token": re.compile(r"(?<![A-Za-z0-9])sub_[a-z2-7]{26}(?![a-z2-7])"),
}


def _luhn(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


# Every detector needs an "@", "sub_" or a run of at least nine digits (with separators): a cheap
# first look that lets the common case (policy vocabulary, short numbers) skip the detectors.
_MAYBE = re.compile(r"@|sub_|\d(?:[ ().-]?\d){8}")


def find_pii(text: str) -> Iterator[tuple[str, str]]:
    """Yield ``(kind, match)`` for each span of ``text`` that looks like personal data."""
    if not _MAYBE.search(text):
        return
    for kind, pat in _PATTERNS.items():
        for m in pat.finditer(text):
            s = m.group(0)
            digits = re.sub(r"\D", "", s)
            if kind == "card" and not _luhn(digits):
                continue
            if kind == "phone" and (len(digits) < 9 or len(digits) > 15 or "-" not in s and " " not in s and "+" not in s):
                continue  # plain numbers (versions, counts, epochs) are not phone numbers
            yield kind, s


def redact(text: str) -> tuple[str, int]:
    """Replace every detected span with ``[redacted:<kind>]``; return the text and the count."""
    count = 0
    for kind, span in list(find_pii(text)):
        if span in text:
            count += text.count(span)
            text = text.replace(span, f"[redacted:{kind}]")
    return text, count
