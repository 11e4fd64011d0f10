from decimal import Decimal
from pathlib import Path

import pytest

from services.metering.pricing import ModelPrice, PriceTable, format_amount
from sluice.config import load_settings
from sluice.v1 import envelope_pb2


def table(**rates: str) -> PriceTable:
    return PriceTable(
        version="t1", currency="USD", models={"m": ModelPrice(**{k: Decimal(v) for k, v in rates.items()})}
    )


def test_prices_input_output_and_cached_tokens_exactly() -> None:
    prices = table(input_per_mtok="3", output_per_mtok="15", cached_input_per_mtok="0.3")
    usage = envelope_pb2.Usage(prompt_tokens=1000, cached_tokens=400, completion_tokens=200)
    cost = prices.price("m", usage)
    # 600*3 + 400*0.3 + 200*15 = 1800 + 120 + 3000 = 4920 per 1M tokens -> 0.00492 USD
    assert cost.nanos == 4_920_000
    assert cost.amount == "0.00492"
    assert (cost.currency, cost.price_version) == ("USD", "t1")


def test_zero_tokens_cost_zero_plus_request_fee() -> None:
    assert table(input_per_mtok="1", output_per_mtok="1").price("m", envelope_pb2.Usage()).nanos == 0
    fee = table(input_per_mtok="1", output_per_mtok="1", per_request="0.0001")
    assert fee.price("m", envelope_pb2.Usage()).nanos == 100_000


def test_sub_nano_amounts_round_half_even() -> None:
    prices = table(input_per_mtok="0.0005", output_per_mtok="0")
    assert prices.price("m", envelope_pb2.Usage(prompt_tokens=1)).nanos == 0  # 0.5 nano -> 0
    assert prices.price("m", envelope_pb2.Usage(prompt_tokens=3)).nanos == 2  # 1.5 nano -> 2


def test_unknown_model_is_an_error_not_a_free_request() -> None:
    with pytest.raises(KeyError, match="nope"):
        table(input_per_mtok="1", output_per_mtok="1").price("nope", envelope_pb2.Usage(prompt_tokens=1))


@pytest.mark.parametrize(
    ("nanos", "text"), [(0, "0"), (1, "0.000000001"), (4_200, "0.0000042"), (2_500_000_000, "2.5")]
)
def test_format_amount(nanos: int, text: str) -> None:
    assert format_amount(nanos) == text


def test_default_price_table_prices_the_default_model() -> None:
    settings = load_settings()
    prices = PriceTable.load(settings.prices_file)
    cost = prices.price(
        settings.catalog.default_model, envelope_pb2.Usage(prompt_tokens=50, completion_tokens=50)
    )
    assert cost.nanos > 0


def test_negative_rates_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("version: x\nmodels:\n  m: {input_per_mtok: '-1', output_per_mtok: '1'}\n")
    with pytest.raises(ValueError, match="input_per_mtok"):
        PriceTable.load(path)
