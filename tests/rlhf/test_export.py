"""rlhf.export: a child of a GGUF-carried parent is exported with the same carried construction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rlhf.export import export_like_parent

CARRIED_PARENT = {
    "precision": "int4", "execution_provider": "cpu",
    # An older manifest may record the carried variant's own (empty) builder options: the graph
    # must still come from the base variant's builder settings.
    "build": {"builder": {"precision": "int4", "execution_provider": "cpu", "extra_options": {}},
              "carried": {"graph_from": "cpu-int4-rtn-last-pruned", "accuracy_level": 4, "exact_top_k": 4}},
}


@pytest.fixture(scope="module")
def tiny_child(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random float32 checkpoint standing in for a trained child."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.hf_export import copy_tokenizer, save_checkpoint
    from model.tiny import SEED, TINY_CONFIG, tokenizer_dir

    out = tmp_path_factory.mktemp("child-hf")
    torch.manual_seed(SEED + 1)
    save_checkpoint(LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)), out)
    copy_tokenizer(tokenizer_dir(), out)
    return out


def test_child_of_a_carried_parent_is_carried_from_its_fp32_weights(tiny_child: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from model import quant_blocks as qb
    from model.carry_blocks import carried_weights
    from model.genai import greedy, load

    exported = export_like_parent(tiny_child, tmp_path, CARRIED_PARENT)
    assert exported.build["carried"]["graph_from"] == "cpu-int4-rtn-last-pruned"
    assert exported.build["builder"]["extra_options"] == {"algo_config": "rtn_last", "prune_lm_head": "true"}
    state = load_file(str(tiny_child / "model.safetensors"))
    weights = carried_weights(exported.path)
    up = state["model.layers.1.mlp.up_proj.weight"]
    np.testing.assert_allclose(weights[(1, "up_proj")], qb.quantize_q4_1(up).dequantize(), rtol=0, atol=1e-6)
    assert np.abs(weights[(1, "up_proj")] - up).max() <= np.abs(up).max() / 15  # within a 4-bit step
    np.testing.assert_array_equal(weights[(None, "lm_head")],
                                  qb.quantize_q8_0(state["model.embed_tokens.weight"]).dequantize())
    model, tokenizer = load(exported.path, "cpu")  # the export runs
    assert greedy(model, tokenizer, [1, 2, 3, 4], 5, stop_at_eos=False).new_tokens == 5


def test_the_layers_a_child_trained_are_exported_at_8_bit(tiny_child: Path, tmp_path: Path) -> None:
    """A round's update is small against a 4-bit step: the trained layers keep it at Q8_0, the
    untouched ones stay Q4_1 like the parent's; the export still runs."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from model import quant_blocks as qb
    from model.carry_blocks import carried_weights
    from model.genai import greedy, load
    from rlhf.export import EIGHT_BIT_ACCURACY_LEVEL, trained_layers

    state = load_file(str(tiny_child / "model.safetensors"))
    last = max(int(name.split(".")[2]) for name in state if name.startswith("model.layers."))
    parent_hf = tmp_path / "parent-hf"
    shutil.copytree(tiny_child, parent_hf)
    parent_state = dict(state)
    nudged = f"model.layers.{last}.mlp.down_proj.weight"
    parent_state[nudged] = state[nudged] - np.float32(1e-3)  # the child moved its top layer only
    save_file(parent_state, str(parent_hf / "model.safetensors"))
    assert trained_layers(tiny_child, parent_hf) == frozenset({last})

    exported = export_like_parent(tiny_child, tmp_path / "run", CARRIED_PARENT, parent_hf)
    assert exported.build["carried"]["eight_bit_layers"] == [last]
    assert exported.build["carried"]["eight_bit_accuracy_level"] == EIGHT_BIT_ACCURACY_LEVEL
    weights = carried_weights(exported.path)
    top = state[f"model.layers.{last}.self_attn.o_proj.weight"]
    np.testing.assert_allclose(weights[(last, "o_proj")], qb.quantize_q8_0(top).dequantize(), rtol=0, atol=1e-6)
    assert np.abs(weights[(last, "o_proj")] - top).max() <= np.abs(top).max() / 127  # within an 8-bit step
    below = state["model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_allclose(weights[(0, "up_proj")], qb.quantize_q4_1(below).dequantize(), rtol=0, atol=1e-6)
    model, tokenizer = load(exported.path, "cpu")
    assert greedy(model, tokenizer, [1, 2, 3, 4], 5, stop_at_eos=False).new_tokens == 5


def test_a_scored_parent_gets_a_gated_child_with_its_greedy_fidelity(tiny_child: Path, tmp_path: Path) -> None:
    """The child is scored against its own float32 export and its parent on the quiz, and its
    served greedy answers are compared with the float32's on the given prompts."""
    from rlhf.export import export_within_gate

    # a parent that answers everything: the random tiny child cannot be within 2 points of it
    parent = {**CARRIED_PARENT, "quality": {"score": 150, "total": 150, "score_pct": 100.0}}
    exported = export_within_gate(tiny_child, tmp_path, parent, fidelity_prompts=["Hello", "What is 2+2?"],
                                  fidelity_tokens=4)
    assert exported.fidelity is not None
    assert exported.fidelity["prompts"] == 2 and exported.fidelity["max_new_tokens"] == 4
    assert 0 <= exported.fidelity["served_equals_fp32"] <= 2
    assert set(exported.scores) >= {"child_fp32"}
    gate = exported.quality["gate"] if exported.quality else {}
    assert gate["reference"] == "child fp32" and gate["parent_pct"] == 100.0
    assert gate["passed_vs_parent"] is False and gate["passed"] is False  # the registry will refuse it


def test_child_of_a_table_lookup_parent_gets_table_lookup_nodes(tiny_child: Path, tmp_path: Path) -> None:
    import shutil

    import onnx

    from model.genai import greedy, load
    from model.lut_graph import custom_ops_library
    from model.lut_kernel import OP

    if shutil.which("cargo") is None:
        pytest.skip("cargo (Rust) is not installed: the custom op's library cannot be built")
    carried = {**CARRIED_PARENT["build"]["carried"], "accuracy_level": 0}
    plain = export_like_parent(tiny_child, tmp_path / "plain", {**CARRIED_PARENT, "build": {
        **CARRIED_PARENT["build"], "carried": carried}})
    lut = export_like_parent(tiny_child, tmp_path / "lut", {**CARRIED_PARENT, "build": {
        **CARRIED_PARENT["build"], "carried": {**carried, "lut": True}}})
    graph = onnx.load(str(lut.path / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == OP for n in graph.node) == 10  # 2 layers x qkv, o, gate, up, down
    assert [n.op_type for n in graph.node if n.op_type == "MatMulNBits"] == ["MatMulNBits"]  # the LM head
    library = custom_ops_library(lut.path)
    assert library is not None and library.is_file()
    answers = []
    for export in (plain, lut):
        model, tokenizer = load(export.path, "cpu")
        answers.append(greedy(model, tokenizer, [1, 2, 3, 4], 5, stop_at_eos=False).text)
    assert answers[0] == answers[1]  # the same blocks, float32 activations either way
