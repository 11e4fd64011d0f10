"""Redacting token streams without buffering them.

Model output can hold personal data (echoed, hallucinated, memorized), so the
inference worker passes every chunk through :class:`StreamRedactor` before it
reaches sluice.tokens.v1. Text is released at whitespace and sentence
boundaries; only a tail that could still be the start of an entity (a
capitalised word, digits, a secret's prefix, an open key block) is held back,
and only up to a bound. Released text is analyzed together with the held tail,
so an entity is seen whole even when it spans chunks.

:class:`PlaceholderRestorer` is the inverse for the caller's gateway: it puts
the originals of pseudonymized placeholders back, even when a placeholder
arrives split across chunks.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence

from services.redaction.analyzer import PLACEHOLDER_RE, Finding

__all__ = ["Analyze", "AnalyzeAsync", "PlaceholderRestorer", "Render", "StreamRedactor"]

# Finds entities in one text; raises to fail closed.
Analyze = Callable[[str], Sequence[Finding]]
AnalyzeAsync = Callable[[str], Awaitable[Sequence[Finding]]]
# Replacement text for (entity type, value).
Render = Callable[[str, str], str]

_CONTEXT_CHARS = 80
_TITLES = frozenset({"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "mt.", "jr.", "sr."})
_HOLD_WORDS = frozenset({"bearer", "token", "key", "authorization:"})
_OPEN_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_CLOSE_KEY = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----")


def _continuable(word: str) -> bool:
    """Could this word be the first part of an entity that continues in the next word?"""
    if not word:
        return False
    if PLACEHOLDER_RE.fullmatch(word):
        return False
    if word.lower() in _TITLES or word.lower() in _HOLD_WORDS:
        return True
    if word[-1] in ".!?;" and not word[-1:].isdigit():
        return False  # a sentence ends here
    core = word.strip("\"'([{")
    if not core:
        return True
    return core[0].isupper() or core[0] == "+" or any(c.isdigit() for c in core) or core.startswith("-")


class StreamRedactor:
    """Redacts a stream incrementally: push() what arrives, finish() at the end.

    The analysis is the only costly step, so it comes in two forms: `analyze`
    (synchronous, for callers without an event loop) and `analyze_async` (the
    inference worker's: awaits a batch shared with every other stream, so N
    concurrent streams cost one nlp.pipe batch, not N analyses fighting over the
    GIL). Both see exactly the same text, so they release exactly the same.
    """

    def __init__(
        self,
        analyze: Analyze,
        render: Render,
        holdback_chars: int = 64,
        analyze_async: AnalyzeAsync | None = None,
    ) -> None:
        self._analyze = analyze
        self._analyze_async = analyze_async
        self._render = render
        self._holdback = holdback_chars
        self._pending = ""
        # The tail of what was already released, in clear: analysis context only
        # ("I live in" before "Reykjavik"), never released again.
        self._context = ""
        self._turn = asyncio.Lock()

    @property
    def held(self) -> int:
        """Characters held back right now."""
        return len(self._pending)

    def push(self, delta: str, final: bool = False) -> str:
        """Add a delta; returns the redacted text that is now safe to release (maybe '').

        With `final`, the stream ends here: everything left is released, after one analysis.
        """
        cut = self._take(delta, final)
        return self._release(cut, self._analyze(self._context + self._pending)) if cut > 0 else ""

    def finish(self) -> str:
        """End of stream: release everything that is left, redacted."""
        return self.push("", final=True)

    async def push_async(self, delta: str, final: bool = False) -> str:
        """push(), analysed through `analyze_async` (shared batches) when there is one.

        Calls on one stream run one at a time: findings are offsets into the text
        as it was when analysed, which a delta pushed meanwhile would shift.
        """
        async with self._turn:
            cut = self._take(delta, final)
            if cut <= 0:
                return ""
            text = self._context + self._pending
            if self._analyze_async is None:
                return self._release(cut, await asyncio.to_thread(self._analyze, text))
            return self._release(cut, await self._analyze_async(text))

    def _take(self, delta: str, final: bool) -> int:
        """Adds `delta`; how much may go now (0: nothing, so nothing needs analysing)."""
        self._pending += delta
        return len(self._pending) if final else self._cut()

    def _cut(self) -> int:
        """How much of the pending text can go now: up to a boundary, before any open entity."""
        text = self._pending
        open_key = _OPEN_KEY.search(text)
        if open_key and not _CLOSE_KEY.search(text, open_key.end()):
            return open_key.start()  # a key block is released only whole (or at the end)
        # The last boundary: only whitespace-terminated words are complete.
        end = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t")) + 1
        if end <= 0:
            return 0 if len(text) <= self._holdback * 4 else len(text) - self._holdback
        # Walk back over words that might continue into the next chunk.
        cut = end
        for match in reversed(list(re.finditer(r"\S+\s+", text[:end]))):
            if not _continuable(match.group().rstrip()):
                break
            if end - match.start() > self._holdback:
                break
            cut = match.start()
        return cut

    def _release(self, cut: int, found: Sequence[Finding]) -> str:
        """Releases pending text up to `cut`, given the findings in context + pending."""
        text = self._pending
        shift = len(self._context)
        findings = sorted(
            (
                Finding(max(f.start - shift, 0), f.end - shift, f.entity_type, f.score)
                for f in found
                if f.end > shift
            ),
            key=lambda f: f.start,
        )
        # Never cut through an entity: release only up to the start of one that crosses.
        for f in findings:
            if f.start < cut < f.end:
                cut = f.start
        parts: list[str] = []
        cursor = 0
        for f in findings:
            if f.end > cut or f.start < cursor:
                continue
            parts.append(text[cursor : f.start])
            parts.append(self._render(f.entity_type, text[f.start : f.end]))
            cursor = f.end
        parts.append(text[cursor:cut])
        self._pending = text[cut:]
        self._context = _context_tail(self._context + text[:cut])
        return "".join(parts)


def _context_tail(released: str) -> str:
    """The last _CONTEXT_CHARS of released text, starting at a word (a cut word is noise to NER)."""
    if len(released) <= _CONTEXT_CHARS:
        return released
    tail = released[-_CONTEXT_CHARS:]
    if released[-_CONTEXT_CHARS - 1].isspace():
        return tail
    space = re.search(r"\s", tail)
    return tail[space.end() :] if space else tail


class PlaceholderRestorer:
    """Puts originals back for placeholders in `originals`, across chunk boundaries."""

    def __init__(self, originals: Mapping[str, str]) -> None:
        self._originals = dict(originals)
        self._longest = max((len(p) for p in self._originals), default=0)
        self._pending = ""

    def push(self, delta: str) -> str:
        text = self._pending + delta
        # Hold a trailing '<...' that could still grow into a known placeholder.
        start = text.rfind("<")
        hold = start >= 0 and ">" not in text[start:] and len(text) - start < self._longest
        ready, self._pending = (text[:start], text[start:]) if hold else (text, "")
        return self._restore(ready)

    def finish(self) -> str:
        text, self._pending = self._pending, ""
        return self._restore(text)

    def _restore(self, text: str) -> str:
        if not self._originals or "<" not in text:
            return text
        return PLACEHOLDER_RE.sub(lambda m: self._originals.get(m.group(), m.group()), text)
