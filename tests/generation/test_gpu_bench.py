"""`bench.gpu_engine` on the CPU provider: the code a lent GPU runs, kept working between loans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_gpu_engine_bench_smoke_runs_every_phase_on_cpu(tiny_model_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams, ORT GenAI's static batch and the exactness count all run and land in the JSON."""
    from bench import common, gpu_engine

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert gpu_engine.main(["--cpu", "--model-dir", str(tiny_model_dir)]) == 0
    doc = json.loads((tmp_path / "gpu_engine.json").read_text(encoding="utf-8"))
    res = doc["results"]
    for name in ("colloquy-engine", "ort-genai"):
        assert res[name]["streams"]["4"]["median"] > 0
        assert res[name]["itl_ms"]["4"]["n"] > 0
    exact = res["exactness"]
    assert exact["prompts"] == 4
    # the tiny model on the CPU provider is exact (tests/generation/test_exactness.py): all four agree
    assert exact["batch1_eq_generator"] == exact["batched_eq_batch1"] == exact["cached_eq_batch1"] == 4
