"""The price catalog: exact money, dated rates, fallback pricing, refusal of bad catalogs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.metering.pricing import Catalog, CatalogError, format_amount, parse_amount
from sluice.config import load_settings
from sluice.v1 import envelope_pb2

NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)


def catalog(**rates: object) -> Catalog:
    return Catalog.parse(
        {
            "version": "t1",
            "fallback": {"input_per_mtok": "10", "output_per_mtok": "20"},
            "models": {"m": {k: str(v) for k, v in rates.items()}},
        }
    )


def test_prices_input_output_and_cached_tokens_exactly() -> None:
    prices = catalog(input_per_mtok="3", output_per_mtok="15", cached_input_per_mtok="0.3")
    usage = envelope_pb2.Usage(prompt_tokens=1000, cached_tokens=400, completion_tokens=200)
    price = prices.price("m", usage, NOW)
    # 600*3 + 400*0.3 + 200*15 = 1800 + 120 + 3000 = 4920 per 1M tokens -> 0.00492 USD
    assert price.cost.nanos == 4_920_000
    assert price.cost.amount == "0.00492"
    assert (price.cost.currency, price.cost.price_version, price.fallback) == ("USD", "t1", False)


def test_zero_tokens_cost_zero_plus_request_fee() -> None:
    assert (
        catalog(input_per_mtok="1", output_per_mtok="1").price("m", envelope_pb2.Usage(), NOW).cost.nanos == 0
    )
    fee = catalog(input_per_mtok="1", output_per_mtok="1", per_request="0.0001")
    assert fee.price("m", envelope_pb2.Usage(), NOW).cost.nanos == 100_000


def test_gpu_hour_is_spread_by_engine_busy_time() -> None:
    pool = catalog(input_per_mtok="0", output_per_mtok="0", gpu_hour="3.60")
    # 1.5 s of a 3.60/hour engine = 0.0015
    assert pool.price("m", envelope_pb2.Usage(), NOW, engine_busy_ms=1500).cost.nanos == 1_500_000


def test_sub_nano_amounts_round_half_even() -> None:
    prices = catalog(input_per_mtok="0.0005", output_per_mtok="0")
    assert prices.price("m", envelope_pb2.Usage(prompt_tokens=1), NOW).cost.nanos == 0  # 0.5 nano -> 0
    assert prices.price("m", envelope_pb2.Usage(prompt_tokens=3), NOW).cost.nanos == 2  # 1.5 nano -> 2


def test_unknown_model_is_charged_at_the_fallback_rate_and_flagged() -> None:
    price = catalog(input_per_mtok="1", output_per_mtok="1").price(
        "nope", envelope_pb2.Usage(prompt_tokens=1000), NOW
    )
    assert price.fallback is True
    assert price.cost.nanos == 10_000_000  # 1000 tokens at 10 per 1M = 0.01, never $0


def test_the_rate_in_force_on_the_completion_day_applies() -> None:
    dated = Catalog.parse(
        {
            "version": "t2",
            "fallback": {"input_per_mtok": "9", "output_per_mtok": "9"},
            "models": {
                "m": [
                    {"effective_from": "2026-01-01", "input_per_mtok": "1", "output_per_mtok": "0"},
                    {"effective_from": "2026-06-01", "input_per_mtok": "2", "output_per_mtok": "0"},
                ]
            },
        }
    )
    usage = envelope_pb2.Usage(prompt_tokens=1_000_000)
    assert dated.price("m", usage, datetime(2026, 3, 1, tzinfo=UTC)).cost.nanos == 1_000_000_000
    assert dated.price("m", usage, datetime(2026, 6, 1, tzinfo=UTC)).cost.nanos == 2_000_000_000
    before = dated.price("m", usage, datetime(2025, 12, 31, tzinfo=UTC))
    assert before.fallback and before.cost.nanos == 9_000_000_000


@pytest.mark.parametrize(
    ("nanos", "text"),
    [(0, "0"), (1, "0.000000001"), (4_200, "0.0000042"), (2_500_000_000, "2.5"), (-5, "-0.000000005")],
)
def test_format_amount(nanos: int, text: str) -> None:
    assert format_amount(nanos) == text


def test_parse_amount_is_exact_and_names_the_field() -> None:
    assert parse_amount("0.1", "--usd") == 100_000_000
    with pytest.raises(ValueError, match="--usd"):
        parse_amount("ten", "--usd")


def test_default_catalog_prices_the_default_model_and_marks_examples() -> None:
    settings = load_settings()
    prices = Catalog.load(settings.prices_file)
    price = prices.price(
        settings.catalog.default_model, envelope_pb2.Usage(prompt_tokens=50, completion_tokens=50), NOW
    )
    assert price.cost.nanos > 0 and not price.fallback
    proto = prices.to_proto()
    assert any(rate.example for rate in proto.rates)
    assert any(rate.gpu_hour not in ("", "0") for rate in proto.rates)
    assert len(proto.digest) == 64


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("models:\n  m: {input_per_mtok: '-1', output_per_mtok: '1'}\n", "models.m.0.input_per_mtok"),
        ("models:\n  m: {input_per_mtok: 0.1, output_per_mtok: '1'}\n", "models.m.0.input_per_mtok"),
        ("models:\n  m: {input_per_mtok: '1', output_per_mtok: '1', typo: '1'}\n", "models.m.0.typo"),
    ],
)
def test_an_invalid_catalog_is_refused_naming_the_entry(tmp_path: Path, body: str, named: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("version: x\nfallback: {input_per_mtok: '1', output_per_mtok: '1'}\n" + body)
    with pytest.raises(CatalogError, match=named.replace(".", r"\.")):
        Catalog.load(path)


def test_a_catalog_without_fallback_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("version: x\nmodels: {}\n")
    with pytest.raises(CatalogError, match="fallback"):
        Catalog.load(path)
