"""The GGUF's own 4-/8-bit blocks carried into ONNX Runtime's kernels (model.quant_blocks, .carry_blocks).

Unit tests pin each layout on small synthetic blocks; the real-model tests check every weight of
the carried builds against the GGUF (dequantized by the `gguf` package's own reference code) and
the float32 checkpoint, and compare greedy answers with the float32 build.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model import quant_blocks as qb
from model.paths import build_dir
from tests.model.conftest import BUILD_HINT

RNG = np.random.default_rng(7)


def q4_1_bytes(d: float, m: float, q: np.ndarray) -> np.ndarray:
    """One GGUF Q4_1 block written by hand: fp16 d, fp16 m, element j low / j+16 high nibble."""
    head = np.array([d, m], dtype=np.float16).view(np.uint8)
    nibbles = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    return np.concatenate([head, nibbles])


def test_parse_q4_1_reads_scale_min_and_nibble_order() -> None:
    q = np.arange(32, dtype=np.uint8) % 16
    raw = np.stack([q4_1_bytes(0.5, -2.0, q), q4_1_bytes(0.25, 1.0, q[::-1].copy())])
    blocks = qb.parse_q4_1(raw)
    assert blocks.q.shape == (2, 32)
    assert blocks.q[0].tolist() == q.tolist()
    assert blocks.d.tolist() == [[0.5], [0.25]] and blocks.m.tolist() == [[-2.0], [1.0]]
    np.testing.assert_array_equal(blocks.dequantize()[0], 0.5 * q - 2.0)


def test_parse_q8_0() -> None:
    q = np.arange(-16, 16, dtype=np.int8)
    raw = np.concatenate([np.array([0.125], dtype=np.float16).view(np.uint8), q.view(np.uint8)])[None]
    blocks = qb.parse_q8_0(raw)
    np.testing.assert_array_equal(blocks.dequantize()[0], 0.125 * q.astype(np.float32))


def test_matmul_nbits_4_packing_round_trips_exactly() -> None:
    blocks = qb.Q4Blocks(RNG.integers(0, 16, (6, 64), dtype=np.uint8),
                         RNG.random((6, 2), dtype=np.float32), -RNG.random((6, 2), dtype=np.float32))
    packed, scales, correction = qb.pack_matmul_nbits_4(blocks)
    assert packed.shape == (6, 2, 16) and packed.dtype == np.uint8
    assert packed[0, 0, 0] == blocks.q[0, 0] | (blocks.q[0, 1] << 4)  # element 2i low, 2i+1 high
    np.testing.assert_allclose(qb.unpack_matmul_nbits_4(packed, scales, correction),
                               blocks.dequantize(), rtol=0, atol=1e-6)


def test_matmul_nbits_8_packing_is_bit_exact() -> None:
    blocks = qb.Q8Blocks(RNG.integers(-127, 128, (3, 64), dtype=np.int8), RNG.random((3, 2), dtype=np.float32))
    packed, scales = qb.pack_matmul_nbits_8(blocks)
    np.testing.assert_array_equal(qb.unpack_matmul_nbits_8(packed, scales), blocks.dequantize())


def test_unpermute_undoes_llama_cpp_permutation() -> None:
    n_head, head_dim = 3, 8
    w = RNG.random((n_head * head_dim, 4), dtype=np.float32)
    # convert_hf_to_gguf.py's permute():
    permuted = w.reshape(n_head, 2, head_dim // 2, 4).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(permuted[qb.unpermute_rows(n_head * head_dim, n_head)], w)


def test_quantize_q4_1_is_within_half_a_step_and_keeps_extremes() -> None:
    w = RNG.normal(size=(4, 96)).astype(np.float32)
    blocks = qb.quantize_q4_1(w)
    err = np.abs(blocks.dequantize() - w).reshape(4, 3, 32)
    assert (err <= blocks.d[..., None] * 0.5 + 1e-3).all()
    assert blocks.q.min() == 0 and blocks.q.max() == 15


def test_quantize_q8_0_error_is_below_half_a_step() -> None:
    w = RNG.normal(size=(2, 64)).astype(np.float32)
    blocks = qb.quantize_q8_0(w)
    err = np.abs(blocks.dequantize() - w).reshape(2, 2, 32)
    assert (err <= blocks.d[..., None] * 0.5 + 1e-3).all()


# -- the real model ------------------------------------------------------------------------------
def _dir(name: str) -> Path:
    path = build_dir() / name
    if not path.exists():
        pytest.skip(f"{BUILD_HINT} ({path} missing)")
    return path


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    files = sorted(_dir("gguf").glob("*.gguf"))
    if not files:
        pytest.skip(BUILD_HINT)
    return files[0]


@pytest.mark.model
@pytest.mark.parametrize("variant", ["cpu-int4-gguf", "cpu-int4-gguf-f32act", "cpu-int4-gguf-lut"])
def test_carried_weights_equal_the_gguf_and_the_fp32_checkpoint(variant: str, gguf_file: Path,
                                                                hf_fp32_dir: Path) -> None:
    """Every 4-bit node plus its correction (or its table-lookup node), and the 8-bit table, computes with
    the GGUF's weights."""
    import gguf
    from safetensors.numpy import load_file

    from model.carry_blocks import carried_weights

    carried = carried_weights(_dir(f"onnx/{variant}"))
    reader = gguf.GGUFReader(str(gguf_file))
    ref = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    hf = load_file(str(hf_fp32_dir / "model.safetensors"))
    assert len(carried) == 30 * 5 + 1
    np.testing.assert_array_equal(carried[(None, "lm_head")], ref["token_embd.weight"])
    for layer in range(30):
        blk = f"blk.{layer}."
        qkv = np.concatenate([ref[blk + "attn_q.weight"][qb.unpermute_rows(576, 9)],
                              ref[blk + "attn_k.weight"][qb.unpermute_rows(192, 3)],
                              ref[blk + "attn_v.weight"]])
        expect = {"qkv_proj": qkv, "o_proj": ref[blk + "attn_output.weight"],
                  "gate_proj": ref[blk + "ffn_gate.weight"], "up_proj": ref[blk + "ffn_up.weight"],
                  "down_proj": ref[blk + "ffn_down.weight"]}
        for proj, want in expect.items():  # d*(q-8) + (m+8d) vs d*q + m: float rounding only
            np.testing.assert_allclose(carried[(layer, proj)], want, rtol=0, atol=2e-6,
                                       err_msg=f"layer {layer} {proj}")
        p = f"model.layers.{layer}."
        hf_qkv = np.concatenate([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        np.testing.assert_allclose(carried[(layer, "qkv_proj")], hf_qkv, rtol=0, atol=2e-6)


@pytest.mark.model
def test_fp32_blocks_of_the_checkpoint_are_the_gguf_blocks(gguf_file: Path, hf_fp32_dir: Path) -> None:
    """ggml's Q4_1 rounding of the dequantized weights gives back the GGUF's blocks: the RLHF
    child's export (float32 -> Q4_1) is the same quantizer that made the served weights."""
    import gguf
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(str(gguf_file))
    tensors = {t.name: t for t in reader.tensors}
    hf = load_file(str(hf_fp32_dir / "model.safetensors"))
    for layer in (0, 17, 29):
        own = qb.parse_q4_1(np.asarray(tensors[f"blk.{layer}.ffn_up.weight"].data))
        made = qb.quantize_q4_1(hf[f"model.layers.{layer}.mlp.up_proj.weight"])
        np.testing.assert_array_equal(made.q, own.q)
        np.testing.assert_array_equal(made.d, own.d)
        np.testing.assert_array_equal(made.m, own.m)


@pytest.mark.model
@pytest.mark.parametrize(("variant", "least"), [("cpu-int4-gguf-f32act", 0.9), ("cpu-int4-gguf", 0.6)])
def test_greedy_answers_match_fp32_on_most_prompts(variant: str, least: float, onnx_fp32_dir: Path) -> None:
    """Greedy answers of the carried builds against the float32 build on the capitals quiz."""
    from model.genai import chat, load
    from model.quality import CAPITALS_16

    answers = {}
    for name, path in (("fp32", onnx_fp32_dir), (variant, _dir(f"onnx/{variant}"))):
        model, tokenizer = load(path, "cpu")
        answers[name] = [chat(model, tokenizer, q.messages(), 24).text for q in CAPITALS_16]
    same = sum(a == b for a, b in zip(answers["fp32"], answers[variant], strict=True))
    print(f"{variant}: {same}/{len(CAPITALS_16)} greedy answers equal to fp32's")
    assert same >= least * len(CAPITALS_16), list(zip(answers["fp32"], answers[variant], strict=True))


@pytest.mark.model
def test_child_export_of_unchanged_weights_is_the_served_build(hf_fp32_dir: Path) -> None:
    """rlhf.export's construction (float32 -> Q4_1/Q8_0 -> carried) applied to the base's own
    float32 weights gives the served GGUF build's weights back: a child is rounded as its parent."""
    from safetensors.numpy import load_file

    from model.carry_blocks import carried_weights, fp32_weights

    state = load_file(str(hf_fp32_dir / "model.safetensors"))
    served = carried_weights(_dir("onnx/cpu-int4-gguf"))
    source = fp32_weights(state)
    for layer, proj in ((0, "qkv_proj"), (11, "gate_proj"), (29, "down_proj")):
        blocks = source(layer, proj)
        np.testing.assert_allclose(blocks.dequantize(), served[(layer, proj)], rtol=0, atol=2e-6)
    np.testing.assert_array_equal(source(None, "lm_head").dequantize(), served[(None, "lm_head")])
