"""Incremental steps and the served-default rule (no model needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.build import VARIANTS, choose_default, select_variants, version_name
from model.steps import read_stamp, run_step


def test_step_runs_once_then_is_up_to_date(tmp_path: Path) -> None:
    calls: list[Path] = []

    def action(out: Path) -> None:
        calls.append(out)
        (out / "a.txt").write_text("hello")

    out = tmp_path / "step"
    first = run_step("t", out, {"x": 1}, action)
    assert len(calls) == 1 and (out / "a.txt").read_text() == "hello"
    assert first["outputs"]["a.txt"]["size"] == 5
    assert run_step("t", out, {"x": 1}, action) == first
    assert len(calls) == 1
    run_step("t", out, {"x": 2}, action)  # input changed
    assert len(calls) == 2
    (out / "a.txt").write_text("truncated!")  # output damaged (size differs)
    run_step("t", out, {"x": 2}, action)
    assert len(calls) == 3


def test_failed_step_leaves_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "step"
    run_step("t", out, {"x": 1}, lambda o: (o / "a.txt").write_text("v1"))

    def broken(o: Path) -> None:
        (o / "a.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_step("t", out, {"x": 2}, broken)
    assert (out / "a.txt").read_text() == "v1"
    stamp = read_stamp(out)
    assert stamp is not None and stamp["inputs"] == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["step"]


def test_choose_default_is_fastest_within_one_question() -> None:
    quality = {"cpu-fp32": {"score": 10}, "cpu-int4-rtn": {"score": 8},
               "cpu-int4-rtn-last": {"score": 9}, "cpu-int4-kquant-mixed": {"score": 10},
               "cuda-fp16": {"skipped": "no GPU"}}
    speed = {"cpu-fp32": {"decode_tok_s": 30.0}, "cpu-int4-rtn": {"decode_tok_s": 140.0},
             "cpu-int4-rtn-last": {"decode_tok_s": 120.0},
             "cpu-int4-kquant-mixed": {"decode_tok_s": 100.0}}
    assert choose_default(quality, speed) == "cpu-int4-rtn-last"
    quality["cpu-int4-rtn-last"]["score"] = 8
    assert choose_default(quality, speed) == "cpu-int4-kquant-mixed"


def test_choose_default_breaks_speed_ties_by_score() -> None:
    quality = {"cpu-fp32": {"score": 10}, "cpu-int4-rtn": {"score": 9},
               "cpu-int4-rtn-last": {"score": 10}}
    speed = {"cpu-fp32": {"decode_tok_s_best": 30.0}, "cpu-int4-rtn": {"decode_tok_s_best": 104.0},
             "cpu-int4-rtn-last": {"decode_tok_s_best": 100.0}}
    assert choose_default(quality, speed) == "cpu-int4-rtn-last"  # within 5%: score wins
    speed["cpu-int4-rtn"]["decode_tok_s_best"] = 120.0
    assert choose_default(quality, speed) == "cpu-int4-rtn"  # clearly faster and eligible
    del quality["cpu-fp32"]  # without fp32 the best score is the reference
    quality["cpu-int4-rtn"]["score"] = 8
    assert choose_default(quality, speed) == "cpu-int4-rtn-last"


def test_select_variants() -> None:
    names = [v.name for v in select_variants(["fp32"], None, cuda=False)]
    assert names == ["cpu-fp32"]
    with_cuda = [v.name for v in select_variants(["fp32"], None, cuda=True)]
    assert {"cuda-fp16", "cuda-int4-rtn-last"} <= set(with_cuda)
    assert all(VARIANTS[n].execution_provider == "cpu"
               for n in (v.name for v in select_variants(["int4", "fp32"], None, cuda=False)))


def test_version_names_are_content_addressed() -> None:
    v = VARIANTS["cpu-fp32"]
    assert version_name(v, "ab" * 32) == "smollm2-135m-cpu-fp32-" + "ab" * 6
