"""carry() on a small builder-shaped graph run by ONNX Runtime: each node gets the accuracy level
its ``(layer, projection)`` maps to, and the corrected outputs equal x @ W^T for the carried
weights, with gate and up as two nodes or fused into one (no model files needed; the
real-model checks are in test_carry_blocks.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model import quant_blocks as qb
from model.carry_blocks import (
    FUSED_GATE_UP,
    LM_HEAD_SCALE,
    LM_HEAD_WEIGHT,
    BlockSource,
    CarryError,
    carried_weights,
    carry,
)

HIDDEN, FFN, VOCAB = 64, 96, 40
RNG = np.random.default_rng(11)


def _node_path(name: str) -> str:
    """The builder's node path for a weight prefix: model.layers.0.mlp.up_proj -> /model/layers.0/mlp/up_proj."""
    parts = name.split(".")
    return "/" + "/".join([*parts[:1], ".".join(parts[1:3]), *parts[3:]]) if len(parts) > 2 else "/" + name


def _mnb(name: str, x: str, out: str, k: int, n: int, bits: int = 4) -> tuple[object, list[object]]:
    """A builder-style MatMulNBits node (symmetric, block 32) with placeholder weights."""
    from onnx import helper, numpy_helper

    if bits == 4:
        weight, scale = f"{name}.MatMul.weight_Q4G32", f"{name}.MatMul.weight_scale"
    else:
        weight, scale = LM_HEAD_WEIGHT, LM_HEAD_SCALE
    inits = [numpy_helper.from_array(np.zeros((n, k // 32, 32 * bits // 8), np.uint8), weight),
             numpy_helper.from_array(np.ones((n, k // 32), np.float32), scale)]
    node = helper.make_node("MatMulNBits", [x, weight, scale], [out], domain="com.microsoft",
                            name=_node_path(name) + f"/MatMul_Q{bits}", K=k, N=n,
                            bits=bits, block_size=32, accuracy_level=4)
    return node, inits


def _builder_like(path: Path) -> None:
    """x -> gate, up (one input) -> gate*up -> down -> + x -> LM head (8-bit) -> logits."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = [], []
    for args in (("model.layers.0.mlp.gate_proj", "x", "gate", HIDDEN, FFN),
                 ("model.layers.0.mlp.up_proj", "x", "up", HIDDEN, FFN),
                 ("model.layers.0.mlp.down_proj", "act", "down", FFN, HIDDEN)):
        node, more = _mnb(*args)
        nodes.append(node)
        inits += more
    nodes.insert(2, helper.make_node("Mul", ["gate", "up"], ["act"], name="/model/layers.0/mlp/Mul"))
    nodes.append(helper.make_node("Add", ["down", "x"], ["h"], name="/model/residual"))
    head, more = _mnb("lm_head", "h", "logits", HIDDEN, VOCAB, bits=8)
    nodes.append(head)
    inits += more
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", HIDDEN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    path.mkdir(parents=True)
    onnx.save_model(model, str(path / "model.onnx"))


def _source() -> tuple[BlockSource, dict[tuple[int | None, str], qb.Q4Blocks | qb.Q8Blocks]]:
    """Random Q4_1 blocks for layer 0's gate, up and down, Q8_0 for the LM head."""
    blocks: dict[tuple[int | None, str], qb.Q4Blocks | qb.Q8Blocks] = {
        (0, "gate_proj"): qb.quantize_q4_1(RNG.normal(size=(FFN, HIDDEN)).astype(np.float32)),
        (0, "up_proj"): qb.quantize_q4_1(RNG.normal(size=(FFN, HIDDEN)).astype(np.float32)),
        (0, "down_proj"): qb.quantize_q4_1(RNG.normal(size=(HIDDEN, FFN)).astype(np.float32)),
        (None, "lm_head"): qb.quantize_q8_0(RNG.normal(size=(VOCAB, HIDDEN)).astype(np.float32))}

    def source(layer: int | None, proj: str) -> qb.Q4Blocks | qb.Q8Blocks:
        return blocks[(layer, proj) if layer is not None else (None, "lm_head")]

    return source, blocks


@pytest.mark.parametrize("fuse", [False, True])
def test_carried_graph_maps_levels_per_projection_and_computes_with_the_blocks(tmp_path: Path,
                                                                               fuse: bool) -> None:
    import onnx
    import onnxruntime as ort

    _builder_like(tmp_path / "src")
    source, blocks = _source()
    levels = {"gate_proj": 0, "up_proj": 0 if fuse else 4, "down_proj": 4 if fuse else 0}
    counts = carry(tmp_path / "src", tmp_path / "out", source,
                   accuracy_level=lambda layer, proj: levels[proj], fuse_gate_up=fuse)
    # gate and up share one block sum either way
    assert counts == {"nodes_4bit": 3 - fuse, "blocksums": 2, "tables_8bit": 1,
                      **({"fused_gate_up": 1} if fuse else {})}

    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    attrs = {n.name.split("/")[-2]: {a.name: a.i for a in n.attribute}
             for n in model.graph.node if n.op_type == "MatMulNBits"}
    want_levels = {**levels, "lm_head": 4}  # the LM head stays at 4 whatever the body's levels
    if fuse:
        want_levels = {FUSED_GATE_UP: levels["gate_proj"], "down_proj": levels["down_proj"], "lm_head": 4}
        assert attrs[FUSED_GATE_UP]["N"] == 2 * FFN
    assert {name: a["accuracy_level"] for name, a in attrs.items()} == want_levels

    carried = carried_weights(tmp_path / "out")
    for key, want in blocks.items():
        np.testing.assert_allclose(carried[key], want.dequantize(), rtol=0, atol=2e-6, err_msg=str(key))

    x = RNG.normal(size=(1, 3, HIDDEN)).astype(np.float32)
    w = {k: v.dequantize() for k, v in blocks.items()}
    act = (x @ w[(0, "gate_proj")].T) * (x @ w[(0, "up_proj")].T)
    hidden = act @ w[(0, "down_proj")].T + x
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"x": x})
    # one projection and the head quantize their input to int8 (level 4): close, not equal
    want = hidden @ w[(None, "lm_head")].T
    np.testing.assert_allclose(logits, want, rtol=0, atol=0.03 * np.abs(want).max())
    # without the Q4_1 corrections the output would be far off: the check can fail
    assert np.abs(logits - _without_corrections(x, blocks)).max() > 0.1 * np.abs(want).max()


def _without_corrections(x: np.ndarray, blocks: dict[tuple[int | None, str], qb.Q4Blocks | qb.Q8Blocks]
                         ) -> np.ndarray:
    """The same network with each 4-bit weight as MatMulNBits alone reads it: d*(q-8)."""

    def kernel(b: qb.Q4Blocks) -> np.ndarray:
        n, k = b.q.shape
        return ((b.q.reshape(n, -1, 32).astype(np.float32) - 8) * b.d[..., None]).reshape(n, k)

    act = (x @ kernel(blocks[(0, "gate_proj")]).T) * (x @ kernel(blocks[(0, "up_proj")]).T)
    return (act @ kernel(blocks[(0, "down_proj")]).T + x) @ blocks[(None, "lm_head")].dequantize().T


def test_fusing_refuses_gate_and_up_at_different_levels(tmp_path: Path) -> None:
    _builder_like(tmp_path / "src")
    source, _ = _source()
    with pytest.raises(CarryError, match="one accuracy level"):
        carry(tmp_path / "src", tmp_path / "out", source, fuse_gate_up=True,
              accuracy_level=lambda layer, proj: 4 if proj == "up_proj" else 0)
