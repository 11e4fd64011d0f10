"""The price catalog: versioned, dated rates priced exactly into integer nanos.

Money never touches a float: rates are Decimal strings, every charge is computed
in Decimal and rounded half-even once, into integer nano-units of the currency.
A model missing from the catalog is charged at the catalog's fallback rate and
flagged, so an unpriced model can never run for free by accident.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sluice.v1 import billing_pb2, envelope_pb2

NANOS_PER_UNIT = Decimal(1_000_000_000)
TOKENS_PER_RATE = Decimal(1_000_000)
MS_PER_HOUR = Decimal(3_600_000)
EPOCH = date(1970, 1, 1)


class CatalogError(ValueError):
    """The catalog cannot be used; the message names the entry."""


class Rate(BaseModel):
    """One model's prices from `effective_from` on (per 1M tokens, per request, per engine-hour)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    effective_from: date = EPOCH
    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    cached_input_per_mtok: Decimal = Field(default=Decimal(0), ge=0)
    per_request: Decimal = Field(default=Decimal(0), ge=0)
    gpu_hour: Decimal = Field(default=Decimal(0), ge=0)
    example: bool = False

    @field_validator(
        "input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "per_request", "gpu_hour", mode="before"
    )
    @classmethod
    def _no_floats(cls, value: Any) -> Any:
        # YAML turns 0.1 into a binary float; a price must be written exactly, as a string.
        if isinstance(value, float):
            raise ValueError("write rates as quoted decimal strings (e.g. '0.15'), not floats")
        return value

    def to_proto(self, model: str) -> billing_pb2.ModelRate:
        return billing_pb2.ModelRate(
            model=model,
            effective_from=self.effective_from.isoformat(),
            input_per_mtok=str(self.input_per_mtok),
            output_per_mtok=str(self.output_per_mtok),
            cached_input_per_mtok=str(self.cached_input_per_mtok),
            per_request=str(self.per_request),
            gpu_hour=str(self.gpu_hour),
            example=self.example,
        )


@dataclass(frozen=True)
class Price:
    """A priced usage: the cost, and whether the fallback rate had to be used."""

    cost: envelope_pb2.Cost
    fallback: bool


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    fallback: Rate
    models: dict[str, list[Rate]]

    @field_validator("models", mode="before")
    @classmethod
    def _single_rate_is_a_list(cls, value: Any) -> Any:
        """`model: {rates}` is shorthand for a model with one rate, in force since forever."""
        if isinstance(value, dict):
            return {name: [rates] if isinstance(rates, dict) else rates for name, rates in value.items()}
        return value

    @model_validator(mode="after")
    def _one_rate_per_day(self) -> Catalog:
        for name, rates in self.models.items():
            if not rates:
                raise ValueError(f"models.{name}: needs at least one rate")
            days = [r.effective_from for r in rates]
            if len(set(days)) != len(days):
                raise ValueError(f"models.{name}: two rates share an effective_from date")
        return self

    @classmethod
    def load(cls, path: Path) -> Catalog:
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise CatalogError(f"{path}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise CatalogError(f"{path}: not valid YAML: {exc}") from None
        return cls.parse(raw, str(path))

    @classmethod
    def parse(cls, raw: Any, source: str = "catalog") -> Catalog:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'catalog'}: {err['msg']}" for err in exc.errors()
            )
            raise CatalogError(f"{source}: {problems}") from None

    def rate(self, model: str, on: date) -> Rate | None:
        """The rate in force for `model` on day `on`, or None if there is none."""
        in_force = [r for r in self.models.get(model, ()) if r.effective_from <= on]
        return max(in_force, key=lambda r: r.effective_from) if in_force else None

    def price(self, model: str, usage: envelope_pb2.Usage, at: datetime, engine_busy_ms: int = 0) -> Price:
        rate = self.rate(model, at.astimezone(UTC).date())
        fallback = rate is None
        rate = rate or self.fallback
        uncached = usage.prompt_tokens - usage.cached_tokens
        amount = (
            (
                uncached * rate.input_per_mtok
                + usage.cached_tokens * rate.cached_input_per_mtok
                + usage.completion_tokens * rate.output_per_mtok
            )
            / TOKENS_PER_RATE
            + rate.per_request
            + rate.gpu_hour * engine_busy_ms / MS_PER_HOUR
        )
        nanos = to_nanos(amount)
        cost = envelope_pb2.Cost(
            nanos=nanos, currency=self.currency, amount=format_amount(nanos), price_version=self.version
        )
        return Price(cost, fallback)

    def digest(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_proto(self) -> billing_pb2.PriceCatalog:
        catalog = billing_pb2.PriceCatalog(
            version=self.version,
            currency=self.currency,
            rates=[rate.to_proto(name) for name, rates in sorted(self.models.items()) for rate in rates],
            fallback=self.fallback.to_proto("*"),
            digest=self.digest(),
        )
        catalog.published_at.GetCurrentTime()
        return catalog


def to_nanos(amount: Decimal) -> int:
    return int((amount * NANOS_PER_UNIT).to_integral_value(ROUND_HALF_EVEN))


def format_amount(nanos: int) -> str:
    """Decimal string of a nano amount, without float rounding: 4200 -> '0.0000042'."""
    text = format(Decimal(nanos) / NANOS_PER_UNIT, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_amount(text: str, field: str) -> int:
    """Nanos from a decimal string like '12.50'; ValueError naming `field` otherwise."""
    try:
        amount = Decimal(text)
    except ArithmeticError:
        raise ValueError(f"{field}: {text!r} is not a decimal amount") from None
    if not amount.is_finite():
        raise ValueError(f"{field}: {text!r} is not a finite amount")
    return to_nanos(amount)
