"""Model answers with planted PII, cut into the small deltas a token stream delivers."""

from __future__ import annotations

PEOPLE = [
    ("Jane Roe", "jane.roe@example.org"),
    ("Maria Garcia", "maria.garcia@example.net"),
    ("Tom Becker", "t.becker@example.com"),
    ("Ana Silva", "ana.silva@example.org"),
    ("Lukas Meyer", "lukas.meyer@example.de"),
    ("Emma Wilson", "emma.w@example.co.uk"),
]


def answer(name: str, email: str) -> str:
    return f"Sure! I spoke with {name} yesterday; write to {email} or call +44 20 7946 0958, thanks."


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]
