"""model.lut_graph.to_lut on the small carried graph of test_carry_blocks_graph, run by ONNX
Runtime with the table-lookup op: the same weights read back exactly, the same outputs as the
carried graph's, the corrections gone, and a float32 copy the engine can build from it (no model
files needed; the real build is scored by `make model`'s quality gate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model import lut_kernel
from model.carry_blocks import carry
from model.lut_graph import custom_ops_library, to_lut
from tests.model.test_carry_blocks_graph import HIDDEN, RNG, _builder_like, _source

if shutil.which("cargo") is None:
    pytest.skip("cargo (Rust) is not installed: the custom op's library cannot be built", allow_module_level=True)


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Path, dict]:
    """(carried dir, its table-lookup rewrite, the blocks)."""
    _builder_like(tmp_path / "src")
    source, blocks = _source()
    carry(tmp_path / "src", tmp_path / "carried", source, accuracy_level=0)
    (tmp_path / "carried" / "genai_config.json").write_text(json.dumps({"model": {"decoder": {}}}))
    shutil.copytree(tmp_path / "carried", tmp_path / "lut")
    return tmp_path / "carried", tmp_path / "lut", blocks


def _session(model_dir: Path) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    library = custom_ops_library(model_dir)
    if library is not None:
        opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])


def test_the_rewrite_keeps_the_weights_and_the_outputs(built: tuple[Path, Path, dict]) -> None:
    import onnx
    from onnx import numpy_helper

    carried, lut, blocks = built
    assert to_lut(lut) == {"lut_nodes": 3, "blocksums_dropped": 2}
    model = onnx.load(str(lut / "model.onnx"))
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count((lut_kernel.DOMAIN, lut_kernel.OP)) == 3
    assert ops.count(("com.microsoft", "MatMulNBits")) == 1  # the 8-bit LM head stays
    assert not [n.name for n in model.graph.node if "/carry/" in n.name]  # corrections and block sums gone
    library = custom_ops_library(lut)
    assert library is not None and library.is_file() and library.parent == lut  # travels with the model

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == lut_kernel.OP):
        layer_proj = node.name.split("/")[4]  # /model/layers.0/mlp/<proj>/MatMul_Q4/lut
        w = lut_kernel.dequantize(*(inits[name] for name in node.input[1:4]))
        np.testing.assert_allclose(w, blocks[(0, layer_proj)].dequantize(), rtol=0, atol=2e-6, err_msg=node.name)

    x = RNG.normal(size=(1, 3, HIDDEN)).astype(np.float32)
    (want,) = _session(carried).run(None, {"x": x})
    (got,) = _session(lut).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_the_engine_builds_its_float32_copy_from_the_rewrite(built: tuple[Path, Path, dict]) -> None:
    import onnxruntime as ort

    from services.generation.runner import _float32_session

    _, lut, _ = built
    to_lut(lut)
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(custom_ops_library(lut)))
    copy = _float32_session(lut / "model.onnx", opts, ["CPUExecutionProvider"])
    assert copy is not None
    x = RNG.normal(size=(1, 5, HIDDEN)).astype(np.float32)
    (want,) = _session(lut).run(None, {"x": x})
    np.testing.assert_allclose(copy.run(None, {"x": x})[0], want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_a_graph_without_q4_1_corrections_is_refused(built: tuple[Path, Path, dict]) -> None:
    carried, _, _ = built
    src = carried.parent / "src"
    (src / "genai_config.json").write_text(json.dumps({"model": {"decoder": {}}}))
    with pytest.raises(ValueError, match="not a carried build"):
        to_lut(src)
