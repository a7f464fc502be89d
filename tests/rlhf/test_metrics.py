"""The job's gauges through a real Pushgateway (Debian's binary), and a dead gateway is harmless."""

from __future__ import annotations

from pathlib import Path

from devtools.procs import free_port
from rlhf.metrics import GAUGES, JobMetrics


def test_gauges_reach_a_real_pushgateway(tmp_path: Path) -> None:
    from tests.observability.promstack import Pushgateway

    gateway = Pushgateway(tmp_path)
    try:
        metrics = JobMetrics(f"http://{gateway.address}")
        metrics.update({"reward_mean": 0.25, "kl": 0.125, "step": 3, "not_a_gauge": 9.0}, {"ppo": 42.0})
        text = gateway.metrics_text()
    finally:
        gateway.stop()
    lines = [line for line in text.splitlines() if line.startswith("colloquy_rlhf_")]
    assert any(line.startswith("colloquy_rlhf_reward_mean{") and 'job="colloquy-rlhf"' in line
               and line.endswith(" 0.25") for line in lines), lines
    assert any(line.startswith("colloquy_rlhf_step{") and line.endswith(" 3") for line in lines), lines
    assert any('phase="ppo"' in line and line.endswith(" 42") for line in lines), lines
    assert not any("not_a_gauge" in line for line in lines)
    assert {name for name, _ in GAUGES.values()} >= {"colloquy_rlhf_clip_fraction", "colloquy_rlhf_approx_kl"}


def test_an_unreachable_gateway_does_not_stop_training() -> None:
    JobMetrics(f"http://127.0.0.1:{free_port()}").update({"step": 1})
