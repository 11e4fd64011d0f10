"""The streaming output redactor on real analysis: nothing raw escapes, little is held."""

from __future__ import annotations

import re

import pytest

from services.redaction.boundary import Boundary, output_redactor
from services.redaction.streaming import PlaceholderRestorer, StreamRedactor


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def run(stream: StreamRedactor, chunks: list[str]) -> list[str]:
    released = [stream.push(chunk) for chunk in chunks]
    released.append(stream.finish())
    return released


SECRETS = {
    "Jane Roe": "PERSON",
    "jane.roe@example.org": "EMAIL_ADDRESS",
    "4111 1111 1111 1111": "CREDIT_CARD",
    "+44 20 7946 0958": "PHONE_NUMBER",
    "078-05-1120": "US_SSN",
    "192.168.10.24": "IP_ADDRESS",
    "DE89 3704 0044 0532 0130 00": "IBAN_CODE",
    "AKIAIOSFODNN7EXAMPLE": "AWS_ACCESS_KEY",
    "sk-proj-4fG7hJ2kL9mN3pQ8rS1tV6wX": "API_KEY",
}
ANSWER = (
    "Sure! Jane Roe lives in Paris and her email is jane.roe@example.org. "
    "Her card 4111 1111 1111 1111 and phone +44 20 7946 0958 are on file; SSN 078-05-1120. "
    "Server 192.168.10.24 pays to IBAN DE89 3704 0044 0532 0130 00 with key AKIAIOSFODNN7EXAMPLE "
    "and sk-proj-4fG7hJ2kL9mN3pQ8rS1tV6wX. That is all for today."
)


@pytest.mark.parametrize("size", [1, 3, 7, 16])
def test_entities_split_across_chunks_never_escape(boundary: Boundary, size: int) -> None:
    released = run(output_redactor(boundary, "demo", 64), pieces(ANSWER, size))
    whole = "".join(released)
    for secret, kind in SECRETS.items():
        assert secret not in whole, f"{kind} escaped"
        assert f"<{kind}>" in whole, f"{kind} not redacted: {whole}"
        # No released piece may hold even a recognisable part of a value.
        assert all(secret[: len(secret) // 2 + 1] not in piece for piece in released)
    assert whole.startswith("Sure! <PERSON> lives in <LOCATION>") and whole.endswith("That is all for today.")


def test_plain_text_is_released_at_word_boundaries_not_at_the_end(boundary: Boundary) -> None:
    stream = output_redactor(boundary, "demo", 64)
    assert stream.push("the ") == "the "
    assert stream.push("answer is ") == "answer is "
    assert stream.push("forty") == ""  # a word may still continue
    assert stream.push(" two.") == "forty "
    assert stream.finish() == "two."


def test_held_back_text_is_bounded(boundary: Boundary) -> None:
    stream = output_redactor(boundary, "demo", 32)
    for word in ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India"]:
        stream.push(word + " ")
        assert stream.held <= 32 + len("Foxtrot ")


def test_a_private_key_block_is_held_until_it_closes(boundary: Boundary) -> None:
    block = (
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
        "BKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----"
    )
    released = run(output_redactor(boundary, "demo", 64), pieces(f"Here it is: {block} done.", 5))
    whole = "".join(released)
    assert "MIIEvQ" not in whole and "<PRIVATE_KEY>" in whole
    assert all("MIIE" not in piece for piece in released)


def test_an_unterminated_key_block_is_still_redacted_at_the_end(boundary: Boundary) -> None:
    released = run(
        output_redactor(boundary, "demo", 64), ["-----BEGIN RSA PRIVATE KEY-----\nMIIEvQIBADAN", "Bgkq"]
    )
    assert "MIIE" not in "".join(released)


def test_input_placeholders_pass_through_unchanged(boundary: Boundary) -> None:
    whole = "".join(
        run(output_redactor(boundary, "demo", 64), pieces("Hello <PERSON_1>, nice to meet you!", 2))
    )
    assert whole == "Hello <PERSON_1>, nice to meet you!"


def test_restorer_puts_originals_back_across_chunks() -> None:
    text = "Hello <PERSON_1>! Your mail <EMAIL_ADDRESS_1> and <PERSON_2> stay. a < b"
    originals = {"<PERSON_1>": "Jane Roe", "<EMAIL_ADDRESS_1>": "jane@example.org"}
    for size in (1, 2, 5, 40):
        restorer = PlaceholderRestorer(originals)
        out = "".join([restorer.push(p) for p in pieces(text, size)] + [restorer.finish()])
        assert out == "Hello Jane Roe! Your mail jane@example.org and <PERSON_2> stay. a < b"


def test_restorer_without_originals_is_a_pass_through() -> None:
    restorer = PlaceholderRestorer({})
    assert restorer.push("<PERSON_1> hi") == "<PERSON_1> hi"
    assert re.fullmatch("", restorer.finish())
