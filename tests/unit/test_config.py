from pathlib import Path

import pytest

from sluice.config import ConfigError, load_settings


def test_defaults_match_the_architecture_brief(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_KAFKA_BOOTSTRAP", raising=False)
    settings = load_settings()
    ports = [
        settings.grpc_port(s) for s in ("gateway", "redaction", "prompts", "inference", "metering", "audit")
    ]
    assert ports == [50051, 50052, 50053, 50054, 50055, 50056]
    assert settings.bootstrap == "127.0.0.1:9092"
    assert settings.catalog.resolve("") == "smollm2-135m-instruct"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_GATEWAY_PORT", "6000")
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP", "broker:9092")
    settings = load_settings()
    assert settings.grpc_port("gateway") == 6000
    assert settings.bootstrap == "broker:9092"


def test_yaml_file_is_read_and_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text("audit_port: 7001\nprompts_port: 7002\n")
    monkeypatch.setenv("SLUICE_CONFIG", str(config))
    monkeypatch.setenv("SLUICE_PROMPTS_PORT", "7003")
    settings = load_settings()
    assert settings.grpc_port("audit") == 7001
    assert settings.grpc_port("prompts") == 7003


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SLUICE_GATEWAY_PORT", "not-a-port"),
        ("SLUICE_GATEWAY_PORT", "70000"),
        ("SLUICE_LOG_LEVEL", "chatty"),
        ("SLUICE_INFERENCE_SLOTS", "0"),
    ],
)
def test_invalid_setting_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_unknown_yaml_key_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text("gateway_prot: 1\n")
    monkeypatch.setenv("SLUICE_CONFIG", str(config))
    with pytest.raises(ConfigError, match="SLUICE_GATEWAY_PROT"):
        load_settings()


def test_models_file_with_unknown_default_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("default_model: nope\nmodels: {}\n")
    with pytest.raises(ConfigError, match="SLUICE_MODELS_FILE"):
        load_settings(models_file=models)


def test_catalog_resolves_aliases() -> None:
    catalog = load_settings().catalog
    assert catalog.resolve("smollm2") == "smollm2-135m-instruct"
    assert catalog.resolve("gpt-17") is None
