"""The prompt mix: which prompts a run sends, and which of them carry planted PII.

A `pii_fraction` of the requests get a sentence with a person's name, an
email address, a US phone number and an SSN in front of the prompt. Every
planted value is unique to its request (the email and SSN are built from the
request index), so the loss audit can search every topic for each exact string
and know which request it came from. The values are synthetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_PROMPTS = (
    "Summarize the benefits of writing unit tests in two sentences.",
    "Write a haiku about a river in autumn.",
    "Explain what a Kafka consumer group is to a new engineer.",
    "List three ways to make a web page load faster.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Give me a short recipe for a vegetable soup.",
    "What is the difference between a process and a thread?",
    "Draft a polite email declining a meeting invitation.",
)

# Names spaCy's English NER reliably tags as PERSON.
FIRST_NAMES = ("John", "Maria", "David", "Sarah", "Michael", "Laura", "James", "Emily")
LAST_NAMES = ("Smith", "Garcia", "Johnson", "Miller", "Brown", "Davis", "Wilson", "Taylor")


@dataclass(frozen=True)
class LoadRequest:
    index: int
    prompt: str  # the full user message, PII included when planted
    pii: tuple[str, ...] = ()  # the planted strings, exactly as they appear in `prompt`
    max_tokens: int | None = None

    @property
    def pii_planted(self) -> bool:
        return bool(self.pii)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def _ssn(rng: np.random.Generator, index: int) -> str:
    """A well-formed SSN (area not 000/666/9xx, group and serial not 0) unique per index."""
    area = int(rng.integers(101, 666))
    group = 10 + index % 90
    serial = 1000 + index % 9000
    return f"{area:03d}-{group:02d}-{serial:04d}"


def planted_pii(rng: np.random.Generator, index: int) -> tuple[str, ...]:
    first = FIRST_NAMES[int(rng.integers(len(FIRST_NAMES)))]
    last = LAST_NAMES[int(rng.integers(len(LAST_NAMES)))]
    name = f"{first} {last}"
    email = f"{first.lower()}.{last.lower()}.lt{index}@example.com"
    phone = f"(415) 555-{int(rng.integers(100, 200)):04d}"
    return name, email, phone, _ssn(rng, index)


@dataclass(frozen=True)
class PromptMix:
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    pii_fraction: float = 0.3
    max_tokens: int | None = None  # None: the target's default output length
    sentence: str = field(
        default="My name is {0}, my email is {1}, call me at {2}; my SSN is {3}. ", repr=False
    )

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("prompts: the mix needs at least one prompt")
        if not 0.0 <= self.pii_fraction <= 1.0:
            raise ValueError("pii_fraction: must be within [0, 1]")

    def build(self, count: int, seed: int = 0) -> list[LoadRequest]:
        """`count` requests, the same for the same seed."""
        rng = np.random.default_rng([seed, 1])  # independent of the arrival schedule's stream
        requests = []
        for index in range(count):
            prompt = self.prompts[int(rng.integers(len(self.prompts)))]
            pii: tuple[str, ...] = ()
            if rng.random() < self.pii_fraction:
                pii = planted_pii(rng, index)
                prompt = self.sentence.format(*pii) + prompt
            requests.append(LoadRequest(index, prompt, pii, self.max_tokens))
        return requests
