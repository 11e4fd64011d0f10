"""Kafka ingress: every record on sluice.requests.v1 is authenticated before redaction uses it.

Other systems produce `GenerationRequested` straight into Kafka, so the first
consumer (redaction) repeats what the gateway does for a gRPC call: find the
API key, check the tenant and model, and decide where replies may go. The
gateway signs its own records the same way on the caller's behalf, so there is
one rule for every record and no unsigned back door (docs/ingress.md).

Two ways to authenticate, in record headers:

- `sluice-signature: key_id=<id>,ts=<unix s>,sig=<hex>`: HMAC-SHA256 over
  `signed_text`, keyed by the key's ingress signing secret. That secret is
  derived from the server master key and the key id (`IngressSigning`), so it
  is on no topic: reading sluice.keys.v1 is not enough to sign. It is shown
  at `sluice keys create` and by `sluice ingress secret`. It never travels,
  and the signature binds the payload, the record key, the reply topic and a
  timestamp (refused when older than SLUICE_INGRESS_SIGNATURE_MAX_AGE_S).
- `sluice-key-ref: <key_id>:<hex SHA-256 of the key>`: the key's hash as a
  bearer token, for producers that cannot sign. Whoever reads the topic can
  reuse it, so only where sluice.requests.v1 is locked down.

Replies go to `sluice-reply-to` (a topic allowed by SLUICE_INGRESS_REPLY_TOPICS
that exists); `sluice-reply-mode: completion` (or `batch: true`) sends only the
finished/charged/failed events, no token chunks.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import RecordMetadata

from services.gateway import keys as key_material
from services.gateway.auth import KeyStore, Principal, _principal
from services.gateway.validation import Invalid, validate
from services.redaction.vault import Keyring, keyring_from_settings
from sluice import metrics
from sluice.config import Settings
from sluice.kafka import Output, with_backoff
from sluice.kafka_security import client_options
from sluice.logs import get_logger
from sluice.topics import BATCH_REPLIES, TOKENS, BadEvent
from sluice.v1 import events_pb2, gateway_pb2, keys_pb2

log = get_logger()

SIGNATURE = "sluice-signature"
KEY_REF = "sluice-key-ref"
REPLY_TO = "sluice-reply-to"
REPLY_MODE = "sluice-reply-mode"
SIGNED_PREFIX = "sluice-ingress-v1"
SIGNING_PURPOSE = "ingress-signing"
# Reply topics only Sluice's own services may name (in the body, not the header).
INTERNAL_REPLY_TOPICS = (TOKENS, BATCH_REPLIES)
# How long an unknown key id may be waited for: a key made a moment ago may not be read yet.
KEY_CATCH_UP_S = 1.0
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_FIELD = re.compile(r"(\w+)=([^,]*)")


class Rejected(BadEvent):
    """An ingress refusal; its message (the dead letter's reason) names the header or field."""


def signed_text(ts: int, request_id: str, reply_to: str, value: bytes) -> bytes:
    """What a `sluice-signature` covers: timestamp, record key, reply topic and payload digest."""
    digest = hashlib.sha256(value).hexdigest()
    return f"{SIGNED_PREFIX}\n{ts}\n{request_id}\n{reply_to}\n{digest}".encode()


@dataclass(frozen=True)
class IngressSigning:
    """Per-key signing secrets, derived from a server-side master key.

    HKDF-SHA256(master, info = "sluice/ingress-signing/<key_id>"): one secret per
    key, computable only where the master key is (gateways, redaction, the
    operator's CLI) and never written to any topic, so a reader of
    sluice.keys.v1 cannot forge a signature. The master is the server key that
    every gateway and redaction instance already holds (SLUICE_REDACTION_MASTER_KEY,
    or <state_dir>/redaction-master.key locally); the `info` label separates this
    use from the redaction keys derived from it.
    """

    keyring: Keyring

    @classmethod
    def from_settings(cls, settings: Settings) -> IngressSigning:
        return cls(keyring_from_settings(settings))

    def secret(self, key_id: str) -> bytes:
        return self.keyring.key(key_id, SIGNING_PURPOSE)


def signature_header(
    key_id: str, secret: bytes, request_id: str, value: bytes, reply_to: str = "", now: float | None = None
) -> tuple[str, bytes]:
    ts = int(time.time() if now is None else now)
    sig = hmac.new(secret, signed_text(ts, request_id, reply_to, value), hashlib.sha256).hexdigest()
    return SIGNATURE, f"key_id={key_id},ts={ts},sig={sig}".encode()


def key_ref_header(key_id: str, key: str) -> tuple[str, bytes]:
    return KEY_REF, f"{key_id}:{key_material.digest(key).hex()}".encode()


async def send_signed(
    producer: AIOKafkaProducer, service: str, output: Output, key_id: str, signing: IngressSigning
) -> RecordMetadata:
    """Produce a request signed for the key `key_id` (the gateway, on its caller's behalf)."""
    value = output.event.SerializeToString()
    header = signature_header(key_id, signing.secret(key_id), output.key, value)
    written = await producer.send_and_wait(
        output.topic, value, key=output.key.encode(), headers=[*output.headers, header]
    )
    metrics.EVENTS_PRODUCED.labels(service, output.topic).inc()
    return written


def _headers(record: ConsumerRecord[bytes, bytes]) -> dict[str, str]:
    return {name.lower(): bytes(value).decode(errors="replace") for name, value in record.headers or ()}


@dataclass
class ReplyTopics:
    """Which reply topics exist and have a leader for every partition (a topic made a moment
    ago may not yet: writing there would fail the metering transaction that also holds the
    charge). A miss is looked up again at most every `refresh_s`."""

    bootstrap: str
    refresh_s: float = 2.0
    _ready: set[str] = field(default_factory=set)
    _checked: dict[str, float] = field(default_factory=dict)

    async def exists(self, topic: str) -> bool:
        if topic not in self._ready and time.monotonic() - self._checked.get(topic, 0.0) >= self.refresh_s:
            if await with_backoff("topic metadata", "redaction", lambda: self._led(topic)):
                self._ready.add(topic)
            self._checked[topic] = time.monotonic()
        return topic in self._ready

    async def _led(self, topic: str) -> bool:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, **client_options(), client_id="sluice-ingress"
        )
        await admin.start()
        try:
            # Listing first: a metadata request naming a missing topic may auto-create it.
            if topic not in await admin.list_topics():
                return False
            described = await admin.describe_topics([topic])
        finally:
            await admin.close()
        return any(
            t["topic"] == topic
            and t["error_code"] == 0
            and t["partitions"]
            and all(p["error_code"] == 0 and p["leader"] >= 0 for p in t["partitions"])
            for t in described
        )


@dataclass
class Ingress:
    settings: Settings
    keys: KeyStore
    topics: ReplyTopics
    signing: IngressSigning

    @classmethod
    def from_settings(cls, settings: Settings) -> Ingress:
        return cls(
            settings,
            KeyStore.shared(settings),
            ReplyTopics(settings.bootstrap),
            IngressSigning.from_settings(settings),
        )

    def guard(
        self,
        handler: Callable[
            [events_pb2.GenerationRequested, ConsumerRecord[bytes, bytes]], Awaitable[Sequence[Output]]
        ],
    ) -> Callable[
        [events_pb2.GenerationRequested, ConsumerRecord[bytes, bytes]], Awaitable[Sequence[Output]]
    ]:
        """`handler`, run only for records that pass `admit` (the others are dead-lettered)."""

        async def admitted(
            event: events_pb2.GenerationRequested, record: ConsumerRecord[bytes, bytes]
        ) -> Sequence[Output]:
            await self.admit(event, record)
            return await handler(event, record)

        return admitted

    async def admit(
        self, event: events_pb2.GenerationRequested, record: ConsumerRecord[bytes, bytes]
    ) -> None:
        """Authenticate, check and complete `event` in place, or raise Rejected naming the problem.

        On an authentication failure the claimed tenant and reply topic are cleared first,
        so the dead letter is filed under `unknown` and nothing is sent where the record asked.
        """
        headers = _headers(record)
        try:
            caller = await self._authenticate(event, record, headers)
        except Rejected:
            event.envelope.tenant = ""
            event.ClearField("reply_to")
            raise
        self._check_request(event, caller)
        await self._route_replies(event, caller, headers)

    async def _authenticate(
        self,
        event: events_pb2.GenerationRequested,
        record: ConsumerRecord[bytes, bytes],
        headers: dict[str, str],
    ) -> Principal:
        if SIGNATURE in headers:
            caller = await self._verify_signature(headers[SIGNATURE], record, headers.get(REPLY_TO, ""))
        elif KEY_REF in headers:
            caller = await self._verify_key_ref(headers[KEY_REF])
        else:
            raise Rejected(f"authentication: no {SIGNATURE} or {KEY_REF} header")
        if event.envelope.tenant != caller.tenant:
            raise Rejected("envelope.tenant: does not match the API key's tenant")
        # Metering attributes usage by the key_id of the raw record: it must be the caller's own.
        if event.key_id and event.key_id != caller.key_id:
            raise Rejected("key_id: must be empty or the id of the key the record is authenticated with")
        if caller.role == "auditor":
            raise Rejected("authentication: an auditor key may not make requests")
        return caller

    async def _record(self, key_id: str) -> keys_pb2.ApiKey:
        """The key's record, waiting briefly for one created a moment ago; revoked keys fail."""
        if not self.keys.ready.is_set():
            await self.keys.ready.wait()
        deadline = time.monotonic() + KEY_CATCH_UP_S
        while key_id not in self.keys.records and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        record = self.keys.records.get(key_id)
        if record is None or record.HasField("revoked_at"):
            raise Rejected("authentication: unknown or revoked API key")
        return record

    async def _verify_signature(
        self, header: str, record: ConsumerRecord[bytes, bytes], reply_to: str
    ) -> Principal:
        fields = dict(_FIELD.findall(header))
        key_id, ts, sig = fields.get("key_id", ""), fields.get("ts", ""), fields.get("sig", "")
        if not key_id or not ts.isdigit() or not sig:
            raise Rejected(f"{SIGNATURE}: expected key_id=<id>,ts=<unix seconds>,sig=<hex>")
        if abs(time.time() - int(ts)) > self.settings.ingress_signature_max_age_s:
            raise Rejected(f"{SIGNATURE}: timestamp is outside the allowed window")
        key = await self._record(key_id)
        request_id = bytes(record.key or b"").decode(errors="replace")
        text = signed_text(int(ts), request_id, reply_to, record.value or b"")
        expected = hmac.new(self.signing.secret(key.key_id), text, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sig.lower()):
            raise Rejected(f"{SIGNATURE}: signature does not match")
        return _principal(key)

    async def _verify_key_ref(self, header: str) -> Principal:
        key_id, _, hex_digest = header.partition(":")
        try:
            inner = bytes.fromhex(hex_digest)
        except ValueError:
            inner = b""
        if len(inner) != hashlib.sha256().digest_size:
            raise Rejected(f"{KEY_REF}: expected <key_id>:<hex SHA-256 of the key>")
        key = await self._record(key_id)
        if not hmac.compare_digest(key_material.salted(inner, bytes(key.salt)), bytes(key.key_hash)):
            raise Rejected("authentication: unknown or revoked API key")
        return _principal(key)

    def _check_request(self, event: events_pb2.GenerationRequested, caller: Principal) -> None:
        """The gateway's own checks, so a Kafka request is held to exactly the gRPC rules."""
        request = gateway_pb2.GenerateRequest(
            model=event.model,
            messages=event.messages,
            user=event.user,
            stop=event.params.stop,
            template=event.template if event.HasField("template") else None,
            variables=event.variables,
            context=event.context,
        )
        request.temperature = event.params.temperature  # proto3: unset is 0, which is greedy
        if event.params.max_tokens:
            request.max_tokens = event.params.max_tokens
        if event.params.top_p:
            request.top_p = event.params.top_p
        try:
            valid = validate(request, self.settings.catalog)
        except Invalid as exc:
            raise Rejected(_kafka_field_names(exc.message)) from None
        if not caller.may_use(valid.model):
            raise Rejected(f"model: this API key may not use model {valid.model!r}")
        event.model = valid.model
        if not event.params.max_tokens:
            event.params.max_tokens = valid.max_tokens
            event.max_tokens_defaulted = True
        if not event.params.top_p:
            event.params.top_p = valid.top_p
        event.key_id = caller.key_id

    async def _route_replies(
        self, event: events_pb2.GenerationRequested, caller: Principal, headers: dict[str, str]
    ) -> None:
        topic = headers.get(REPLY_TO, "").strip()
        if not topic:
            if event.reply_to.topic and event.reply_to.topic not in INTERNAL_REPLY_TOPICS:
                event.ClearField("reply_to")
                raise Rejected(f"reply_to.topic: name a reply topic in the {REPLY_TO} header instead")
        else:
            event.ClearField("reply_to")  # never answer a refused record's topic
            if not _TOPIC_NAME.match(topic):
                raise Rejected(f"{REPLY_TO}: not a valid topic name")
            patterns = [p.format(tenant=caller.tenant) for p in self.settings.ingress_reply_topics]
            if topic.startswith("sluice.") or not any(fnmatch.fnmatchcase(topic, p) for p in patterns):
                raise Rejected(f"{REPLY_TO}: topic {topic!r} is not allowed for tenant {caller.tenant!r}")
            if not await self.topics.exists(topic):
                raise Rejected(f"{REPLY_TO}: unknown topic {topic!r}")
            event.reply_to.topic = topic
        mode = headers.get(REPLY_MODE, "").strip().lower()
        if mode not in ("", "stream", "completion"):
            raise Rejected(f"{REPLY_MODE}: must be 'stream' or 'completion'")
        if event.reply_to.topic and (mode == "completion" or (event.batch and topic)):
            event.reply_to.completion_only = True


def _kafka_field_names(message: str) -> str:
    """The gRPC checks name GenerateRequest fields; on Kafka the sampling ones live under `params`."""
    field_name = message.split(":", 1)[0]
    return f"params.{message}" if field_name in _PARAMS else message


_PARAMS = ("max_tokens", "temperature", "top_p", "stop")
