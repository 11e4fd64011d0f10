"""Redactor tests against the real Presidio recognizers and spaCy model (no mocks)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.redaction.analyzer import (
    RedactionError,
    RedactionResult,
    Redactor,
    _resolve_overlaps,
    _Span,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def redactor() -> Iterator[Redactor]:
    # Loading the model takes seconds; share one instance across the module.
    yield Redactor()


def redact_one(redactor: Redactor, text: str) -> RedactionResult:
    return redactor.redact([text])


@pytest.mark.parametrize(
    ("text", "secret", "placeholder"),
    [
        (
            "Write to maria.garcia@example.org today.",
            "maria.garcia@example.org",
            "<EMAIL_ADDRESS_1>",
        ),
        ("Her mobile is +44 20 7946 0958, or", "7946 0958", "<PHONE_NUMBER_1>"),
        ("Call me at (206) 555-0143 tonight.", "555-0143", "<PHONE_NUMBER_1>"),
        ("My phone number is 212-555-0187.", "212-555-0187", "<PHONE_NUMBER_1>"),
        ("I spoke with Dmitri Ivanov yesterday.", "Dmitri Ivanov", "<PERSON_1>"),
        ("Please ship it to Portland.", "Portland", "<LOCATION_1>"),
        ("My social security number is 536-22-1234.", "536-22-1234", "<US_SSN_1>"),
        (
            "Charge card number 4111 1111 1111 1111 please.",
            "4111 1111 1111 1111",
            "<CREDIT_CARD_1>",
        ),
        ("The server IP is 10.0.0.12 behind NAT.", "10.0.0.12", "<IP_ADDRESS_1>"),
        (
            "Wire it to IBAN DE89 3704 0044 0532 0130 00 by Friday.",
            "DE89 3704 0044 0532 0130 00",
            "<IBAN_CODE_1>",
        ),
        (
            "My bank account number is 000123456789.",
            "000123456789",
            "<US_BANK_NUMBER_1>",
        ),
    ],
)
def test_detects_and_replaces_entity(redactor: Redactor, text: str, secret: str, placeholder: str) -> None:
    result = redact_one(redactor, text)
    (redacted,) = result.texts
    assert secret not in redacted
    assert placeholder in redacted
    entity_type = placeholder.strip("<>").rsplit("_", 1)[0]
    assert result.entity_counts[entity_type] == 1


def test_invalid_luhn_number_is_not_a_credit_card(redactor: Redactor) -> None:
    result = redact_one(redactor, "Charge card number 4111 1111 1111 1112 please.")
    assert "CREDIT_CARD" not in result.entity_counts


def test_text_without_pii_is_unchanged(redactor: Redactor) -> None:
    texts = [
        "Nothing personal here: the build failed at step 3 with exit code 137.",
        "Summarise the attached paragraph in two sentences.",
    ]
    result = redactor.redact(texts)
    assert result.texts == texts
    assert result.entity_counts == {}


def test_numbering_is_consistent_across_texts(redactor: Redactor) -> None:
    result = redactor.redact(
        [
            "Contact Dmitri Ivanov at dmitri@example.com or Sven Olsen.",
            "Sven Olsen and Dmitri Ivanov share dmitri@example.com; also try sven@example.com.",
        ]
    )
    assert result.texts == [
        "Contact <PERSON_1> at <EMAIL_ADDRESS_1> or <PERSON_2>.",
        "<PERSON_2> and <PERSON_1> share <EMAIL_ADDRESS_1>; also try <EMAIL_ADDRESS_2>.",
    ]
    assert result.entity_counts == {"PERSON": 2, "EMAIL_ADDRESS": 2}


def test_entity_counts_count_distinct_placeholders(redactor: Redactor) -> None:
    result = redactor.redact(
        [
            "Sven Olsen lives in Portland; mail sven@example.com.",
            "Again: sven@example.com, sven@example.com. Card 4111 1111 1111 1111.",
            "SSN 536-22-1234, server 192.168.1.20 and 10.0.0.12.",
        ]
    )
    assert result.entity_counts == {
        "PERSON": 1,
        "LOCATION": 1,
        "EMAIL_ADDRESS": 1,
        "CREDIT_CARD": 1,
        "US_SSN": 1,
        "IP_ADDRESS": 2,
    }
    assert result.texts[2] == "SSN <US_SSN_1>, server <IP_ADDRESS_1> and <IP_ADDRESS_2>."


def test_string_detected_once_is_replaced_everywhere(redactor: Redactor) -> None:
    # The small model tags "Priya Sharma" in the first sentence but not in
    # the second; the second occurrence must not leak.
    result = redactor.redact(["My name is Priya Sharma.", "ok Priya Sharma sounds good"])
    assert result.texts == ["My name is <PERSON_1>.", "ok <PERSON_1> sounds good"]
    assert result.entity_counts == {"PERSON": 1}


def test_propagation_respects_word_boundaries(redactor: Redactor) -> None:
    result = redactor.redact(["Please ship it to Portland.", "Portlandia is a TV show."])
    assert result.texts[1] == "Portlandia is a TV show."


def test_date_time_is_opt_in() -> None:
    text = "The meeting is on March 3rd, 2024."
    with_dates = Redactor(entities=["DATE_TIME"])
    assert with_dates.entities == ("DATE_TIME",)
    result = with_dates.redact([text])
    assert "2024" not in result.texts[0]
    assert result.entity_counts == {"DATE_TIME": 1}


def test_default_entities_leave_dates(redactor: Redactor) -> None:
    text = "The meeting is on March 3rd, 2024."
    assert redactor.redact([text]).texts == [text]


def test_empty_request(redactor: Redactor) -> None:
    assert redactor.redact([]) == RedactionResult(texts=[], entity_counts={})
    assert redactor.redact([""]) == RedactionResult(texts=[""], entity_counts={})


def test_single_string_is_rejected(redactor: Redactor) -> None:
    with pytest.raises(TypeError):
        redactor.redact("Sven Olsen")


def test_unknown_entity_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="NOT_AN_ENTITY"):
        Redactor(entities=["PERSON", "NOT_AN_ENTITY"])


def test_analysis_failure_raises_redaction_error_without_text(
    redactor: Redactor,
) -> None:
    # Only English is loaded, so Presidio refuses the language: callers must
    # get RedactionError (and fail closed), with no input text in the error.
    with pytest.raises(RedactionError) as excinfo:
        redactor.redact(["Sven Olsen, sven@example.com"], language="fr")
    assert "Sven" not in str(excinfo.value)
    assert excinfo.value.__cause__ is None


def test_no_text_is_logged(redactor: Redactor, caplog: pytest.LogCaptureFixture) -> None:
    secrets = ["Sven Olsen", "sven@example.com", "536-22-1234"]
    caplog.set_level(logging.DEBUG)
    redactor.redact([f"{secrets[0]} <{secrets[1]}>, SSN {secrets[2]}", "hello"])
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in secrets:
        assert secret not in logged


def test_presidio_log_arguments_are_never_rendered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Presidio's IBAN recognizer logs a rejected candidate this way at ERROR.
    caplog.set_level(logging.DEBUG)
    presidio_logger = logging.getLogger("presidio-analyzer")
    presidio_logger.error("Failed to validate text %s", "DE89 SECRET")
    presidio_logger.debug("Context list is: %s", "sven olsen")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Failed to validate text %s"]


def test_overlapping_findings_merge_so_no_part_stays_in_clear() -> None:
    spans = [
        _Span(0, 10, "PERSON", 0.85),
        _Span(5, 20, "EMAIL_ADDRESS", 1.0),
        _Span(20, 25, "LOCATION", 0.85),
        _Span(21, 30, "US_BANK_NUMBER", 0.9),
        _Span(30, 34, "PHONE_NUMBER", 0.4),
    ]
    assert _resolve_overlaps(spans) == [
        _Span(0, 20, "EMAIL_ADDRESS", 1.0),  # the PERSON part before the email is covered too
        _Span(20, 30, "US_BANK_NUMBER", 0.9),
        _Span(30, 34, "PHONE_NUMBER", 0.4),  # touching is not overlapping
    ]


_NETWORK_PROBE = """
import json, socket, sys

WATCHED = {
    "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg", "urllib.Request",
}
events = []
sys.addaudithook(lambda event, args: events.append(event) if event in WATCHED else None)

from services.redaction.analyzer import Redactor

result = Redactor().redact(["Mail maria.garcia@example.org or bob@example.co.uk."])
during = list(events)

# Positive control: the hook does see a (local-only) name lookup.
try:
    socket.getaddrinfo("localhost", None)
except OSError:
    pass
print(json.dumps({"texts": result.texts, "during": during, "control": events[len(during):]}))
"""


def test_load_and_redact_attempt_no_network(tmp_path: Path) -> None:
    # A fresh process with an empty tldextract cache: with the stock
    # EmailRecognizer this is exactly when tldextract fetches the suffix list.
    env = {
        **os.environ,
        "TLDEXTRACT_CACHE": str(tmp_path / "tldextract"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _NETWORK_PROBE],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["texts"] == ["Mail <EMAIL_ADDRESS_1> or <EMAIL_ADDRESS_2>."]
    assert report["during"] == []
    assert "socket.getaddrinfo" in report["control"]
    assert not (tmp_path / "tldextract").exists()
