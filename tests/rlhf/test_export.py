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
