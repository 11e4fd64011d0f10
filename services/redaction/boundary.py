"""The checks and the policy every redaction path applies: consumer, gRPC, CLI, output streams.

Errors are typed so each caller can map them to its own failure channel:
:class:`InvalidText` and :class:`PolicyError` are the caller's fault
(INVALID_ARGUMENT), :class:`DeadlineExceeded` and :class:`RedactionError`
mean redaction could not be guaranteed (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from services.redaction.analyzer import DeadlineExceeded, Finding, Job, RedactionError, Redactor, is_short
from services.redaction.operators import Applied, apply_policy, render
from services.redaction.policy import (
    PolicyBook,
    PolicyError,
    TenantPolicy,
    load_policy_file,
    parse_policy_yaml,
)
from services.redaction.policy_follower import PolicyFollower
from services.redaction.streaming import StreamRedactor
from services.redaction.vault import Keyring, keyring_from_settings
from sluice.config import Settings
from sluice.kafka import RequestFailed
from sluice.logs import get_logger
from sluice.v1 import privacy_pb2

log = get_logger()

__all__ = ["Boundary", "DeadlineExceeded", "InvalidText", "MicroBatcher", "PolicyError", "RedactionError"]


class InvalidText(ValueError):
    """Text the boundary refuses to analyze; the message starts with the field name."""


def check_text(text: str, field_name: str, max_bytes: int) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidText(f"{field_name}: not valid UTF-8") from None
    if size > max_bytes:
        raise InvalidText(f"{field_name}: {size} bytes is over the limit of {max_bytes} bytes")


def job_for(texts: Sequence[str], policy: TenantPolicy) -> Job:
    return Job(
        list(texts),
        tuple(policy.entities),
        {name: rule.threshold for name, rule in policy.entities.items()},
        tuple(policy.allow),
        policy.deny_pattern(),
    )


@dataclass
class _Pending:
    job: Job
    deadline: float
    future: asyncio.Future[list[list[Finding]]]
    # find_in_turn: the deadline is this many seconds from when the job's analysis starts.
    budget_s: float | None = None


@dataclass
class MicroBatcher:
    """Joins concurrent requests into one nlp.pipe batch: spaCy is far cheaper per text in batches.

    A batch starts as soon as the analyzer is free; requests arriving while it
    works wait for the next batch, so an idle service adds no delay. One request
    never fails the others: a job with a long text (analyzed window by window
    anyway, so batching gains nothing) runs on its own under its own deadline,
    and when a shared batch fails, each of its jobs is retried alone.
    """

    redactor: Redactor
    max_texts: int = 128
    _queue: list[_Pending] = field(default_factory=list)
    _worker: asyncio.Task[None] | None = None

    async def find(self, job: Job, deadline: float) -> list[list[Finding]]:
        future = self._enqueue(_Pending(job, deadline, asyncio.get_running_loop().create_future()))
        try:
            # The caller hears at the deadline; the analyzer stops at its next check.
            return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded("deadline: PII analysis did not finish in time") from None

    async def find_in_turn(self, job: Job, budget_s: float) -> list[list[Finding]]:
        """Like find(), but the deadline runs from when the job's analysis starts, not while it waits.

        For output streams: as when each stream analysed in a thread of its own, a
        busy analyzer delays a stream rather than failing it; the analysis itself
        is bounded all the same (DeadlineExceeded).
        """
        return await self._enqueue(
            _Pending(job, float("inf"), asyncio.get_running_loop().create_future(), budget_s)
        )

    def _enqueue(self, pending: _Pending) -> asyncio.Future[list[list[Finding]]]:
        self._queue.append(pending)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return pending.future

    async def _drain(self) -> None:
        while self._queue:
            batch: list[_Pending] = []
            size = 0
            while self._queue and (not batch or size + len(self._queue[0].job.texts) <= self.max_texts):
                pending = self._queue.pop(0)
                if pending.future.done():
                    continue  # its caller already gave up at the deadline
                batch.append(pending)
                size += len(pending.job.texts)
            shared = [p for p in batch if is_short(p.job)]
            if shared and not await self._run(shared) and len(shared) > 1:
                for p in shared:
                    await self._run([p])
            for p in batch:
                if not is_short(p.job):
                    await self._run([p])

    async def _run(self, batch: list[_Pending]) -> bool:
        """Analyze `batch` together and settle its futures; False if a retry alone may help."""
        batch = [p for p in batch if not p.future.done()]
        if not batch:
            return True
        started = time.monotonic()
        for p in batch:
            if p.budget_s is not None:
                p.deadline = started + p.budget_s
        try:
            results = await asyncio.to_thread(
                self.redactor.find_many,
                [p.job for p in batch],
                deadline=max(p.deadline for p in batch),
            )
        except DeadlineExceeded as exc:  # past the latest deadline, so past every one
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return True
        except Exception as exc:  # fails closed; alone, the others may still succeed
            if len(batch) > 1:
                return False
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return True
        finished = time.monotonic()
        for p, result in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if finished > p.deadline:
                p.future.set_exception(DeadlineExceeded("deadline: PII analysis did not finish in time"))
            else:
                p.future.set_result(result)
        return True


@dataclass
class Boundary:
    """Policy lookup, input checks, analysis under a deadline, operators."""

    policies: PolicyBook
    keyring: Keyring
    max_text_bytes: int
    deadline_s: float
    redactor: Redactor | None = None
    # The reader keeping `policies` current (load_output_boundary); cancelling it stops that.
    following: asyncio.Task[None] | None = None
    _batcher: MicroBatcher | None = None

    def loaded(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self._batcher = MicroBatcher(redactor)

    def policy(self, tenant: str, language: str = "") -> TenantPolicy:
        policy = self.policies.for_tenant(tenant)
        if language and language != policy.language:
            raise PolicyError(f"language: unsupported language {language!r} for tenant {tenant!r}")
        return policy

    def check(self, texts: Sequence[str], field_name: str) -> None:
        for i, text in enumerate(texts):
            check_text(text, field_name.format(i=i), self.max_text_bytes)

    def _require_model(self) -> Redactor:
        if self.redactor is None:
            raise RedactionError("redaction model is not loaded")
        return self.redactor

    def apply_update(self, update: privacy_pb2.PolicyUpdate) -> TenantPolicy | None:
        """A run-time change from sluice.policies.v1; an empty policy drops the tenant's override.

        Raises PolicyError naming the field, and the policy in force stays.
        """
        if not update.tenant:
            raise PolicyError("tenant: must not be empty")
        if not update.policy_yaml.strip():
            self.policies.override(update.tenant, None)
            return None
        policy = parse_tenant_policy(update.policy_yaml, update.tenant)
        self.policies.override(update.tenant, policy)
        return policy

    async def findings(self, policy: TenantPolicy, text: str) -> list[Finding]:
        """Findings in one text under `policy`, analysed in a batch shared with concurrent callers.

        The deadline bounds the analysis, not the wait for a turn (find_in_turn),
        as when every stream analysed in its own thread.
        """
        self._require_model()
        assert self._batcher is not None
        return (await self._batcher.find_in_turn(job_for([text], policy), self.deadline_s))[0]

    def findings_now(self, policy: TenantPolicy, text: str) -> list[Finding]:
        """Findings in one text under `policy`, synchronously (the CLI, the gRPC stream, benches)."""
        redactor = self._require_model()
        deadline = time.monotonic() + self.deadline_s
        return redactor.find_many([job_for([text], policy)], language=policy.language, deadline=deadline)[0][
            0
        ]

    async def redact(
        self, tenant: str, texts: Sequence[str], language: str = ""
    ) -> tuple[Applied, TenantPolicy]:
        """Analyze with micro-batching; raises instead of ever returning unredacted text."""
        policy = self.policy(tenant, language)
        if not policy.redact:
            return _unanalysed(texts, policy), policy
        self._require_model()
        assert self._batcher is not None
        if not any(texts):
            return apply_policy(texts, [[] for _ in texts], policy, b""), policy
        findings = await self._batcher.find(job_for(texts, policy), time.monotonic() + self.deadline_s)
        return apply_policy(texts, findings, policy, self.keyring.hash_salt(tenant)), policy

    def redact_now(
        self, tenant: str, texts: Sequence[str], language: str = ""
    ) -> tuple[Applied, TenantPolicy]:
        """The same, synchronously, for callers without an event loop (CLI)."""
        policy = self.policy(tenant, language)
        if not policy.redact:
            return _unanalysed(texts, policy), policy
        redactor = self._require_model()
        findings = redactor.find_many(
            [job_for(texts, policy)], language=policy.language, deadline=time.monotonic() + self.deadline_s
        )[0]
        return apply_policy(texts, findings, policy, self.keyring.hash_salt(tenant)), policy


def _unanalysed(texts: Sequence[str], policy: TenantPolicy) -> Applied:
    """A tenant that opted out (`redact: false`): its text passes as it came."""
    return apply_policy(texts, [[] for _ in texts], policy, b"")


# What policies may name. A test checks the analyzer really supports each one;
# kept static so policies are validated without loading the model.
SUPPORTED_ENTITIES = frozenset(
    {
        "PERSON",
        "LOCATION",
        "NRP",
        "DATE_TIME",
        "EMAIL_ADDRESS",
        "PHONE_NUMBER",
        "US_SSN",
        "CREDIT_CARD",
        "IP_ADDRESS",
        "IBAN_CODE",
        "US_BANK_NUMBER",
        "US_DRIVER_LICENSE",
        "US_ITIN",
        "US_PASSPORT",
        "URL",
        "CRYPTO",
        "MEDICAL_LICENSE",
        "API_KEY",
        "AWS_ACCESS_KEY",
        "BEARER_TOKEN",
        "JWT",
        "PRIVATE_KEY",
        "DENY_LIST",
    }
)
SUPPORTED_LANGUAGES = frozenset({"en"})


def parse_tenant_policy(text: str, tenant: str) -> TenantPolicy:
    return parse_policy_yaml(
        text,
        supported_entities=SUPPORTED_ENTITIES,
        supported_languages=SUPPORTED_LANGUAGES,
        where=f"tenants.{tenant}",
    )


def boundary_from_settings(settings: Settings) -> Boundary:
    """Policies and keys checked at start: a bad policy file stops the service, naming the field."""
    policies = load_policy_file(
        settings.redaction_policies_file,
        supported_entities=SUPPORTED_ENTITIES,
        supported_languages=SUPPORTED_LANGUAGES,
    )
    for tenant, policy in policies.items():
        if not policy.redact:
            log.warning("policy opts out of redaction: text passes unanalysed", tenant=tenant)
    return Boundary(
        PolicyBook(policies),
        keyring_from_settings(settings),
        settings.redaction_max_text_bytes,
        settings.redaction_deadline_s,
    )


def output_redactor(boundary: Boundary, tenant: str, holdback_chars: int) -> StreamRedactor:
    """A stream redactor under the tenant's policy.

    Placeholders in output are unnumbered (<PERSON>): numbers belong to the
    request's input, and a new <PERSON_1> would be "restored" to someone else.
    The policy in force when the stream starts holds for all of it, so one
    answer is redacted one way; a change applies from the next stream on.
    """
    policy = boundary.policy(tenant)
    salt = boundary.keyring.hash_salt(tenant)
    return StreamRedactor(
        lambda text: boundary.findings_now(policy, text),
        lambda kind, value: render(kind, value, policy, salt, None),
        holdback_chars,
        analyze_async=lambda text: boundary.findings(policy, text),
    )


async def load_output_boundary(settings: Settings) -> Boundary | None:
    """For the inference worker: the boundary with its own analyzer, unless output redaction is off.

    Its policies follow sluice.policies.v1 as the redaction service's do: read to
    the end before this returns, then kept current by `boundary.following`, a
    task of the running loop (the loop's shutdown cancels it).
    """
    if not settings.output_redaction:
        return None
    boundary = boundary_from_settings(settings)
    boundary.loaded(await asyncio.to_thread(Redactor))
    follower = PolicyFollower(settings.bootstrap, boundary.apply_update)
    boundary.following = asyncio.create_task(follower.run(), name="output-redaction-policies")
    caught_up = asyncio.create_task(follower.caught_up.wait())
    await asyncio.wait([boundary.following, caught_up], return_when=asyncio.FIRST_COMPLETED)
    if not caught_up.done():
        caught_up.cancel()
        boundary.following.result()  # raises what stopped the reader
        raise RedactionError("output redaction: the policy reader stopped before it caught up")
    return boundary


def stream_redactor_for(boundary: Boundary | None, tenant: str, settings: Settings) -> StreamRedactor | None:
    """The output redactor for one generation; a tenant without a policy fails the request."""
    if boundary is None:
        return None
    try:
        if not boundary.policy(tenant).redact:
            return None
        return output_redactor(boundary, tenant, settings.output_redaction_holdback_chars)
    except PolicyError as exc:
        raise RequestFailed("INVALID_ARGUMENT", str(exc)) from None


@contextlib.contextmanager
def _fails_closed() -> Iterator[None]:
    """A redaction failure fails the request closed, with the status the caller gets."""
    try:
        yield
    except DeadlineExceeded as exc:
        raise RequestFailed("DEADLINE_EXCEEDED", f"output redaction: {exc}") from None
    except RedactionError as exc:
        raise RequestFailed("UNAVAILABLE", f"output redaction: {exc}") from None


def redact_chunk(stream: StreamRedactor, delta: str, final: bool) -> str:
    """One chunk through the output redactor, synchronously; a redaction failure fails the request closed."""
    with _fails_closed():
        return stream.push(delta, final)


async def redact_chunk_async(stream: StreamRedactor, delta: str, final: bool) -> str:
    """The same, analysed in a batch shared with every concurrent stream (the inference worker's path)."""
    with _fails_closed():
        return await stream.push_async(delta, final)
