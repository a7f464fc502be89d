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


def test_choose_default_is_fastest_within_two_points() -> None:
    quality = {"cpu-fp32": {"score": 150, "total": 200, "same_answer_as_fp32": 200},
               "cpu-int4-rtn": {"score": 145, "total": 200, "same_answer_as_fp32": 200},
               "cpu-int4-rtn-last": {"score": 146, "total": 200, "same_answer_as_fp32": 200},
               "cpu-int4-kquant-mixed": {"score": 150, "total": 200, "same_answer_as_fp32": 200},
               "cuda-fp16": {"skipped": "no GPU"}}
    speed = {"cpu-fp32": {"decode_tok_s": 30.0}, "cpu-int4-rtn": {"decode_tok_s": 140.0},
             "cpu-int4-rtn-last": {"decode_tok_s": 120.0},
             "cpu-int4-kquant-mixed": {"decode_tok_s": 100.0}}
    assert choose_default(quality, speed) == "cpu-int4-rtn-last"  # 73% vs 75%: 2 points
    quality["cpu-int4-rtn-last"]["score"] = 145  # 72.5%: out
    assert choose_default(quality, speed) == "cpu-int4-kquant-mixed"


def test_choose_default_breaks_speed_ties_by_score() -> None:
    quality = {"cpu-fp32": {"score": 100, "total": 100, "same_answer_as_fp32": 100},
               "cpu-int4-rtn": {"score": 99, "total": 100, "same_answer_as_fp32": 100},
               "cpu-int4-rtn-last": {"score": 100, "total": 100, "same_answer_as_fp32": 100}}
    speed = {"cpu-fp32": {"decode_tok_s_best": 30.0}, "cpu-int4-rtn": {"decode_tok_s_best": 104.0},
             "cpu-int4-rtn-last": {"decode_tok_s_best": 100.0}}
    assert choose_default(quality, speed) == "cpu-int4-rtn-last"  # within 5%: score wins
    speed["cpu-int4-rtn"]["decode_tok_s_best"] = 120.0
    assert choose_default(quality, speed) == "cpu-int4-rtn"  # clearly faster and eligible
    del quality["cpu-fp32"]  # without fp32 the best score is the reference
    quality["cpu-int4-rtn"]["score"] = 97
    assert choose_default(quality, speed) == "cpu-int4-rtn-last"


def test_choose_default_needs_fp32s_answers_not_only_its_score() -> None:
    quality = {"cpu-fp32": {"score": 146, "total": 184, "same_answer_as_fp32": 184},
               "cpu-int4-gguf": {"score": 147, "total": 184, "same_answer_as_fp32": 115},
               "cpu-int4-gguf-f32act": {"score": 146, "total": 184, "same_answer_as_fp32": 184}}
    speed = {"cpu-fp32": {"decode_tok_s_best": 24.0}, "cpu-int4-gguf": {"decode_tok_s_best": 65.0},
             "cpu-int4-gguf-f32act": {"decode_tok_s_best": 50.0}}
    assert choose_default(quality, speed) == "cpu-int4-gguf-f32act"  # 115/184 answers differ: out
    quality["cpu-int4-gguf"]["same_answer_as_fp32"] = 170  # 92%: eligible, and faster
    assert choose_default(quality, speed) == "cpu-int4-gguf"


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


def test_build_moves_only_a_pointer_it_set_itself(tmp_path) -> None:
    from model.build import BUILD_REASON, build_owns_pointer
    from model.registry import Registry

    assert not build_owns_pointer(None)
    reg = Registry(tmp_path / "reg")
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_text(name)
        reg.publish(tmp_path / name, name, source="t", precision="int4", execution_provider="cpu")
    reg.set_current_if_unset("generation", "a")
    assert build_owns_pointer(reg.pointer("generation"))  # the build's first pointer
    reg.set_current("generation", "b", reason=BUILD_REASON)
    assert build_owns_pointer(reg.pointer("generation"))
    reg.set_current("generation", "c", reason="operator")  # an operator's choice stays
    assert not build_owns_pointer(reg.pointer("generation"))
    reg.rollback("generation")
    assert not build_owns_pointer(reg.pointer("generation"))
