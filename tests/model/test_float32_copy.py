"""float32_copy() on the small builder-shaped graph of test_carry_blocks_graph: the copy has no
4-bit node and no correction left, keeps the 8-bit LM head, and computes what the quantized
graph computes (to float rounding) at one row and at several."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.carry_blocks import carried_weights, carry
from model.float32_copy import SUFFIX, Float32CopyError, float32_copy
from model.quant_blocks import unpack_matmul_nbits as dequantize_nbits
from tests.model.test_carry_blocks_graph import HIDDEN, _builder_like, _source


def _run(model: object, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("fuse", [False, True])
def test_float32_copy_folds_corrections_and_computes_as_the_quantized_graph(tmp_path: Path, fuse: bool) -> None:
    _builder_like(tmp_path / "src")
    source, _ = _source()
    carry(tmp_path / "src", tmp_path / "out", source, accuracy_level=0, fuse_gate_up=fuse)
    copy, counts = float32_copy(tmp_path / "out" / "model.onnx")

    nodes = list(copy.graph.node)
    assert counts["matmul_4bit"] == counts["corrections_folded"] == 3 - fuse
    assert counts["lm_head_kept"] == 1
    assert [n.name for n in nodes if n.op_type == "MatMulNBits"] == ["/lm_head/MatMul_Q8"]
    assert not [n for n in nodes if "/carry/" in n.name and "Split" not in n.name]  # block sums, corrections, adds
    # the copy's weights are the carried build's, min term included
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in copy.graph.initializer}
    carried = carried_weights(tmp_path / "out")
    down = inits["model.layers.0.mlp.down_proj.MatMul.weight_Q4G32/float32"]
    np.testing.assert_allclose(down, carried[(0, "down_proj")].T, rtol=0, atol=1e-6)

    from onnx import load

    quantized = load(str(tmp_path / "out" / "model.onnx"))
    for rows in (1, 5):
        x = np.random.default_rng(rows).normal(size=(1, rows, HIDDEN)).astype(np.float32)
        want, got = _run(quantized, x), _run(copy, x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_a_graph_without_corrections_dequantizes_with_the_default_zero_point(tmp_path: Path) -> None:
    """The builder's own int4 (no carried blocks): w = d * (q - 8)."""
    _builder_like(tmp_path / "src")  # placeholder blocks: q = 0, d = 1, so every weight is -8
    copy, counts = float32_copy(tmp_path / "src" / "model.onnx")
    assert counts["matmul_4bit"] == 3 and counts["corrections_folded"] == 0
    from onnx import numpy_helper

    gate = next(numpy_helper.to_array(t) for t in copy.graph.initializer if "gate_proj" in t.name)
    assert np.all(gate == -8.0)


def test_dequantize_nbits_reads_low_nibble_first_and_8_bit_blocks() -> None:
    packed = np.array([[[0x21, 0x43]]], dtype=np.uint8)  # block of 4: 1, 2, 3, 4
    np.testing.assert_array_equal(dequantize_nbits(packed, np.array([[2.0]]), 4, 4), [[-14, -12, -10, -8]])
    np.testing.assert_array_equal(dequantize_nbits(np.array([[[128, 130]]], np.uint8), np.array([[0.5]]), 8, 2),
                                  [[0.0, 1.0]])


def test_a_float32_graph_has_nothing_to_copy(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(Float32CopyError, match="no quantized MatMulNBits"):
        float32_copy(tmp_path / "m.onnx")


def test_the_weights_file_holds_the_float32_weights_at_aligned_offsets(tmp_path: Path) -> None:
    """What the engine loads: the graph saved beside the weights file computes as the in-memory copy."""
    import onnx
    import onnxruntime as ort

    _builder_like(tmp_path / "src")
    source, _ = _source()
    carry(tmp_path / "src", tmp_path / "out", source, accuracy_level=0)
    in_memory, _ = float32_copy(tmp_path / "out" / "model.onnx")
    (tmp_path / "copy").mkdir()
    on_disk, counts = float32_copy(tmp_path / "out" / "model.onnx", tmp_path / "copy" / "weights.bin")
    external = [t for t in on_disk.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == counts["matmul_4bit"] == 3
    assert all(t.name.endswith(SUFFIX) and not t.raw_data for t in external)
    assert all(int(next(e.value for e in t.external_data if e.key == "offset")) % 4096 == 0 for t in external)
    onnx.save_model(on_disk, str(tmp_path / "copy" / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "copy" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).normal(size=(1, 4, HIDDEN)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], _run(in_memory, x))
