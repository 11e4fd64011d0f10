"""Settings for every Sluice process: environment (SLUICE_*) over optional YAML.

Validated once at start-up so a bad value stops the process with its name,
instead of failing later on a hot path.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from sluice import kafka_security
from sluice.engine_specs import EngineKind, LlamaCppSettings, OpenAISettings, TrtllmSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"

ServiceName = Literal["gateway", "redaction", "prompts", "inference", "metering", "audit"]
SERVICES: tuple[ServiceName, ...] = ("gateway", "redaction", "prompts", "inference", "metering", "audit")


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


class ModelSpec(BaseModel):
    engine: EngineKind = "llamacpp"
    # The model's GGUF: its chat template and tokenizer for every engine (prompts
    # fit-to-context, exact prompt counts), and its weights for llamacpp.
    source: str
    aliases: list[str] = Field(default_factory=list)
    context_tokens: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    # Settings of the engine named by `engine` (sluice/engine_specs.py); only that one may be set.
    llamacpp: LlamaCppSettings | None = None
    trtllm: TrtllmSettings | None = None
    openai: OpenAISettings | None = None

    @model_validator(mode="after")
    def _engine_sections(self) -> ModelSpec:
        for kind in ("llamacpp", "trtllm", "openai"):
            if kind != self.engine and getattr(self, kind) is not None:
                raise ValueError(f"`{kind}:` settings are given but engine is {self.engine!r}")
        if self.engine == "trtllm" and self.trtllm is None:
            raise ValueError("engine 'trtllm' needs a `trtllm:` section with model_dir")
        if self.engine == "openai" and self.openai is None:
            raise ValueError("engine 'openai' needs an `openai:` section with base_url")
        return self


class ModelCatalog(BaseModel):
    default_model: str
    models: dict[str, ModelSpec]

    def resolve(self, name: str) -> str | None:
        """Canonical model name for a name or alias; '' means the default."""
        if not name:
            return self.default_model
        if name in self.models:
            return name
        for canonical, spec in self.models.items():
            if name in spec.aliases:
                return canonical
        return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="forbid", frozen=True)

    # When unset, the local stack starts (and owns) its own broker.
    kafka_bootstrap: str | None = None
    local_kafka_port: int = Field(default=9092, gt=0, lt=65536)
    # How every Kafka client authenticates (sluice/kafka_security.py, docs/operations.md):
    # SASL_* needs a username and a password (or a file holding it, e.g. a mounted Secret);
    # *SSL trusts `kafka_ssl_ca_file` (default: system roots) and presents cert+key for mTLS.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_ca_file: Path | None = None
    kafka_ssl_cert_file: Path | None = None
    kafka_ssl_key_file: Path | None = None
    kafka_ssl_check_hostname: bool = True
    state_dir: Path = REPO_ROOT / ".sluice"
    host: str = "127.0.0.1"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Tracing (sluice/tracing.py): none, console (stderr), otlp (gRPC to the endpoint),
    # or file (<state_dir>/traces/<service>.jsonl, one JSON span per line).
    traces_exporter: Literal["none", "console", "otlp", "file"] = "none"
    traces_otlp_endpoint: str = "localhost:4317"
    traces_otlp_insecure: bool = True

    gateway_port: int = Field(default=50051, gt=0, lt=65536)
    redaction_port: int = Field(default=50052, gt=0, lt=65536)
    prompts_port: int = Field(default=50053, gt=0, lt=65536)
    inference_port: int = Field(default=50054, gt=0, lt=65536)
    metering_port: int = Field(default=50055, gt=0, lt=65536)
    audit_port: int = Field(default=50056, gt=0, lt=65536)
    # Prometheus /metrics listens on the gRPC port plus this offset.
    metrics_port_offset: int = Field(default=1000, ge=0)

    models_file: Path = DEFAULTS_DIR / "models.yaml"
    prices_file: Path = DEFAULTS_DIR / "prices.yaml"
    topics_file: Path = REPO_ROOT / "schemas" / "topics.yaml"

    # Which sluice.tokens.v1 partition this gateway replica reads its replies from.
    gateway_reply_partition: int = Field(default=0, ge=0)
    # How long the gateway waits for a request's reply events before giving up.
    gateway_reply_timeout_s: float = Field(default=120.0, gt=0)
    # The stream ends this long after `finished` if metering has not priced it yet.
    gateway_cost_wait_s: float = Field(default=10.0, ge=0)
    # Gateway tenancy (issue 8): a larger GenerateRequest is INVALID_ARGUMENT; more
    # streams than this in flight on one replica get UNAVAILABLE at once (no queue);
    # seed the local `demo` tenant's key on sluice.keys.v1 (turn off on a real cluster).
    gateway_max_request_bytes: int = Field(default=1048576, gt=0)
    gateway_max_streams: int = Field(default=256, ge=1)
    gateway_seed_demo_key: bool = True
    # When a worker dies mid-stream and the request re-runs: tell the caller and stream the
    # new attempt (default), or fail the call with UNAVAILABLE so the client retries itself.
    gateway_fail_on_restart: bool = False
    # Optional TLS for every gRPC server (sluice/tls.py): cert+key turn it on; a client
    # CA makes it mutual. Our own clients trust `grpc_tls_ca_file` (default: system roots)
    # and present the client cert+key when set.
    grpc_tls_cert_file: Path | None = None
    grpc_tls_key_file: Path | None = None
    grpc_tls_client_ca_file: Path | None = None
    grpc_tls_ca_file: Path | None = None
    grpc_tls_client_cert_file: Path | None = None
    grpc_tls_client_key_file: Path | None = None
    # Kafka ingress (docs/ingress.md): reply topics a producer may name in `sluice-reply-to`
    # ({tenant} is the authenticated tenant; shell-style wildcards), and how old a
    # `sluice-signature` timestamp may be (either direction) before it is refused.
    ingress_reply_topics: list[str] = Field(
        default_factory=lambda: ["replies.{tenant}", "replies.{tenant}.*"]
    )
    ingress_signature_max_age_s: float = Field(default=300.0, gt=0)

    inference_slots: int = Field(default=1, ge=1)
    inference_threads: int | None = Field(default=None, ge=1)
    token_flush_tokens: int = Field(default=8, ge=1)
    token_flush_ms: int = Field(default=5, ge=0)
    # The time bound while every slot is busy (prompts wait): fewer records per token
    # when the engine, not the stream's smoothness, is what waiting callers need.
    token_flush_busy_ms: int = Field(default=250, ge=0)
    # Inference worker loop (issue 5): model pools this worker serves (names or aliases;
    # empty = every catalog model); its id in completions (unset = host:pid); how long
    # SIGTERM or a rebalance waits for running generations before handing them back;
    # the group session timeout (how soon a dead worker's prompts move); how long a
    # cancel that arrived before its prompt is remembered.
    inference_pools: list[str] = Field(default_factory=list)
    inference_worker_id: str | None = None
    inference_drain_grace_s: float = Field(default=20.0, gt=0)
    inference_session_timeout_ms: int = Field(default=10000, ge=6000)
    inference_cancel_memory_s: float = Field(default=300.0, gt=0)

    redaction_score_threshold: float = Field(default=0.35, ge=0, le=1)
    # --- redaction (issue 3): policies, limits, keys, output redaction ---
    redaction_policies_file: Path = DEFAULTS_DIR / "policies.yaml"
    redaction_max_text_bytes: int = Field(default=262144, gt=0)
    # Analysis taking longer fails the request (DEADLINE_EXCEEDED), never forwards it.
    redaction_deadline_s: float = Field(default=5.0, gt=0)
    # base64 of 32 bytes; unset = <state_dir>/redaction-master.key (made on first use).
    redaction_master_key: SecretStr | None = None
    # Redact model output in the inference worker before it reaches sluice.tokens.v1.
    output_redaction: bool = True
    # Most characters the output redactor may hold back while an entity could continue.
    output_redaction_holdback_chars: int = Field(default=64, ge=8)
    drain_timeout_s: float = Field(default=30.0, gt=0)

    # Audit area. A checkpoint record restates the chain head after this many records.
    audit_checkpoint_every: int = Field(default=1000, ge=1)
    # Base64 of the 32-byte key wrapping per-subject data keys; unset: generated once
    # under <state_dir>/keys/audit-master.key.
    audit_master_key: str | None = None
    # Per-tenant policy (store_content); unset: <state_dir>/audit/policies.yaml.
    audit_policies_file: Path | None = None
    # Completeness check: every interval, the window ending `grace` ago.
    audit_completeness_interval_s: float = Field(default=60.0, gt=0)
    audit_completeness_window_s: float = Field(default=3600.0, gt=0)
    audit_completeness_grace_s: float = Field(default=300.0, ge=0)
    # Refuse Audit calls without an API key (otherwise such a call is an operator's: every tenant).
    audit_require_auth: bool = False
    # Content data keys are per subject and per period of this many seconds; a tenant's
    # content_retention shreds a period's keys once the whole period is older than it.
    audit_key_period_s: int = Field(default=86400, ge=1)
    # How often expired content keys are looked for.
    audit_retention_interval_s: float = Field(default=600.0, gt=0)
    # How far back the output collector starts reading sluice.tokens.v1 when the service starts.
    audit_output_lookback_s: float = Field(default=900.0, gt=0)
    # PostgreSQL index instead of SQLite, e.g. postgresql://user@host/db; unset: SQLite.
    audit_index_dsn: str | None = None

    # Prompts area: what to do when a prompt does not fit the model's context
    # (reject, or drop oldest history turns then cut context documents), the
    # fewest answer tokens a fitted prompt must leave, the render+tokenize LRU
    # size, and how long a registry write waits to be read back.
    prompts_fit_policy: Literal["reject", "truncate"] = "truncate"
    prompts_min_output_tokens: int = Field(default=16, ge=1)
    prompts_cache_size: int = Field(default=1024, ge=0)
    prompts_registry_write_timeout_s: float = Field(default=10.0, gt=0)

    # Metering area: how far back (and how many) charges the pricer reads from the
    # ledger at start-up to refuse charging a re-sent completion twice; records per
    # ledger transaction; how often the budget stream commits (bounds how soon a
    # crossed hard budget reaches the gateways).
    metering_dedupe_window_s: float = Field(default=86400.0, ge=0)
    metering_dedupe_capacity: int = Field(default=1_000_000, ge=1000)
    metering_transaction_records: int = Field(default=500, ge=1)
    metering_budget_commit_s: float = Field(default=0.1, gt=0)

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        """Half a TLS set-up would silently serve plaintext: refuse it, naming the missing half."""
        pairs = (
            ("grpc_tls_cert_file", "grpc_tls_key_file"),
            ("grpc_tls_client_cert_file", "grpc_tls_client_key_file"),
        )
        for one, other in (*pairs, *((b, a) for a, b in pairs)):
            if getattr(self, one) is not None and getattr(self, other) is None:
                raise ValueError(f"SLUICE_{other.upper()} must be set with SLUICE_{one.upper()}")
        if self.grpc_tls_client_ca_file is not None and self.grpc_tls_cert_file is None:
            raise ValueError("SLUICE_GRPC_TLS_CERT_FILE must be set with SLUICE_GRPC_TLS_CLIENT_CA_FILE")
        return self

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        """A bad Kafka security set-up stops the process here, named, not as endless connect retries."""
        kafka_security.security_of(self)
        return self

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = os.environ.get("SLUICE_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    def grpc_port(self, service: ServiceName) -> int:
        port: int = getattr(self, f"{service}_port")
        return port

    def grpc_target(self, service: ServiceName) -> str:
        return f"{self.host}:{self.grpc_port(service)}"

    def metrics_port(self, service: ServiceName) -> int:
        return self.grpc_port(service) + self.metrics_port_offset

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.local_kafka_port}"

    @cached_property
    def catalog(self) -> ModelCatalog:
        try:
            catalog = ModelCatalog.model_validate(_read_yaml(self.models_file, "SLUICE_MODELS_FILE"))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"SLUICE_MODELS_FILE ({self.models_file}): {problems}") from None
        if catalog.default_model not in catalog.models:
            raise ConfigError(f"SLUICE_MODELS_FILE: default_model {catalog.default_model!r} is not in models")
        return catalog


def _read_yaml(path: Path, setting: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{setting}: {path} is not valid YAML: {exc}") from exc


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, or ConfigError naming the bad variable."""
    try:
        settings = Settings(**overrides)
        _ = settings.catalog
    except ValidationError as exc:
        problems = "; ".join(
            f"SLUICE_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(problems) from None
    return settings
