"""Config loading: unit tests of one function, no I/O."""

from __future__ import annotations

import dataclasses

import pytest

from services.common import config


@dataclasses.dataclass(frozen=True)
class Example:
    port: int = config.env("EX_PORT", 8080, check=config.port, hint="a TCP port")
    ratio: float = config.env("EX_RATIO", 0.5)
    enabled: bool = config.env("EX_ENABLED", False)
    names: list[str] = config.env("EX_NAMES", ["a"])
    required: str = config.env("EX_REQUIRED")


def test_defaults_and_parsing() -> None:
    cfg = config.load(Example, {"EX_REQUIRED": "x", "EX_ENABLED": "yes", "EX_NAMES": "p, q"})
    assert cfg == Example(port=8080, ratio=0.5, enabled=True, names=["p", "q"], required="x")


@pytest.mark.parametrize(("env", "needle"), [
    ({"EX_REQUIRED": "x", "EX_PORT": "eighty"}, "EX_PORT='eighty' is not a valid int"),
    ({"EX_REQUIRED": "x", "EX_PORT": "99999"}, "EX_PORT=99999 is out of range: a TCP port"),
    ({"EX_REQUIRED": "x", "EX_ENABLED": "maybe"}, "EX_ENABLED='maybe' is not a valid bool"),
    ({}, "EX_REQUIRED is required"),
])
def test_errors_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.load(Example, env)
    assert needle in str(exc.value)


def test_batch_time_budget_defaults_to_a_third_of_the_transaction_timeout_and_may_not_pass_half() -> None:
    assert config.load(config.KafkaConfig, {}).batch_budget_s == pytest.approx(20 / 3)
    assert config.load(config.KafkaConfig, {"KAFKA_TRANSACTION_TIMEOUT_MS": "6000"}).batch_budget_s == 2.0
    assert config.load(config.KafkaConfig, {"KAFKA_BATCH_TIME_BUDGET_MS": "5000"}).batch_budget_s == 5.0
    with pytest.raises(config.ConfigError, match=r"KAFKA_BATCH_TIME_BUDGET_MS=15000 .*at most half"):
        config.load(config.KafkaConfig, {"KAFKA_BATCH_TIME_BUDGET_MS": "15000"})
