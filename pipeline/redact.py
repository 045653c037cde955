"""Redaction of personal data from text before it leaves the pipeline (eval candidates).

The defaults cover e-mail addresses, phone numbers and card-like numbers (13-19 digits, spaces
or dashes allowed between them); users add their own regular expressions. Card-like numbers are
matched before phone numbers, so a card number is never half-redacted as a phone number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

DEFAULT_PATTERNS: tuple[tuple[str, str], ...] = (
    ("EMAIL", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    ("CARD", r"\b\d(?:[ -]?\d){12,18}\b"),
    ("PHONE", r"(?<![\w])\+?\d[\d ().-]{6,}\d\b"),
)


class Redactor:
    """Replace every match of every pattern with ``[NAME]``."""

    def __init__(self, extra: Iterable[str] = (), defaults: bool = True) -> None:
        named = list(DEFAULT_PATTERNS) if defaults else []
        named += [(f"REDACTED{i}", pattern) for i, pattern in enumerate(extra, 1)]
        try:
            self.patterns = [(name, re.compile(pattern)) for name, pattern in named]
        except re.error as exc:
            raise ValueError(f"bad redaction pattern {exc.pattern!r}: {exc}") from None

    def __call__(self, text: str | None) -> str | None:
        if text is None:
            return None
        for name, pattern in self.patterns:
            text = pattern.sub(f"[{name}]", text)
        return text
