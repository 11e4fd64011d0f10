"""Prices usage exactly: integer nano-units, Decimal arithmetic, half-even rounding."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import yaml
from pydantic import BaseModel, Field

from sluice.v1 import envelope_pb2

NANOS_PER_UNIT = Decimal(1_000_000_000)
TOKENS_PER_RATE = Decimal(1_000_000)


class ModelPrice(BaseModel):
    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    cached_input_per_mtok: Decimal = Field(default=Decimal(0), ge=0)
    per_request: Decimal = Field(default=Decimal(0), ge=0)


class PriceTable(BaseModel):
    version: str
    currency: str = "USD"
    models: dict[str, ModelPrice]

    @classmethod
    def load(cls, path: Path) -> PriceTable:
        return cls.model_validate(yaml.safe_load(path.read_text()))

    def price(self, model: str, usage: envelope_pb2.Usage) -> envelope_pb2.Cost:
        rate = self.models.get(model)
        if rate is None:
            raise KeyError(f"model {model!r} has no price in table {self.version}")
        uncached = usage.prompt_tokens - usage.cached_tokens
        amount = (
            uncached * rate.input_per_mtok
            + usage.cached_tokens * rate.cached_input_per_mtok
            + usage.completion_tokens * rate.output_per_mtok
        ) / TOKENS_PER_RATE + rate.per_request
        nanos = int((amount * NANOS_PER_UNIT).to_integral_value(ROUND_HALF_EVEN))
        return envelope_pb2.Cost(
            nanos=nanos, currency=self.currency, amount=format_amount(nanos), price_version=self.version
        )


def format_amount(nanos: int) -> str:
    """Decimal string of a nano amount, without float rounding: 4200 -> '0.0000042'."""
    text = format(Decimal(nanos) / NANOS_PER_UNIT, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
