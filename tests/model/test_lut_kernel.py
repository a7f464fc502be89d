"""The ``colloquy.ai::Q41LutMatMul`` custom op against numpy, on both its paths (no model needed).

Builds the Rust library with cargo on first use (seconds); skips only when cargo is not installed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model import lut_kernel

if shutil.which("cargo") is None:
    pytest.skip("cargo (Rust) is not installed: the custom op's library cannot be built", allow_module_level=True)

ort = pytest.importorskip("onnxruntime")

SHAPES = [(960, 576), (576, 1536), (16, 32)]
LEADING = [(1,), (3,), (2, 5), (0,)]


@pytest.fixture(scope="module")
def library() -> Path:
    return lut_kernel.library_path()


def blocks(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random Q4_1 blocks, scaled like the GGUF's (small positive d, negative m)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(n, k // 32, 32), dtype=np.uint8)
    d = (rng.random((n, k // 32), dtype=np.float32) * 0.02).astype(np.float32)
    m = (-rng.random((n, k // 32), dtype=np.float32) * 0.1).astype(np.float32)
    return q, d, m


def model_bytes(k: int, rank: int) -> bytes:
    """One Q41LutMatMul node; A of rank ``rank`` with free leading dims, W/D/Mn as inputs."""
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [f"d{i}" for i in range(rank - 1)] + [k])
    w = helper.make_tensor_value_info("W", TensorProto.UINT32, None)
    d = helper.make_tensor_value_info("D", TensorProto.FLOAT, None)
    mn = helper.make_tensor_value_info("Mn", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    node = helper.make_node(lut_kernel.OP, ["A", "W", "D", "Mn"], ["Y"], domain=lut_kernel.DOMAIN)
    graph = helper.make_graph([node], "q4_lut", [a, w, d, mn], [y])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid(lut_kernel.DOMAIN, 1)])
    return model.SerializeToString()


@pytest.fixture(params=["native", "scalar"])
def path(request: pytest.FixtureRequest, library: Path) -> Iterator[str]:
    """Which kernel path sessions made under this fixture use (the env var is read at kernel creation)."""
    old = os.environ.get(lut_kernel.SCALAR_ENV)
    if request.param == "scalar":
        os.environ[lut_kernel.SCALAR_ENV] = "1"
    else:
        os.environ.pop(lut_kernel.SCALAR_ENV, None)
    try:
        yield request.param
    finally:
        if old is None:
            os.environ.pop(lut_kernel.SCALAR_ENV, None)
        else:
            os.environ[lut_kernel.SCALAR_ENV] = old


def session(k: int, rank: int, threads: int = 2) -> Any:
    return ort.InferenceSession(model_bytes(k, rank), lut_kernel.session_options(threads=threads),
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_matches_numpy(path: str, n: int, k: int) -> None:
    q, d, m = blocks(n, k, seed=n + k)
    feeds = lut_kernel.lut_layout(q, d, m)
    dense = ((d[:, :, None].astype(np.float64) * q + m[:, :, None]).reshape(n, k))
    rng = np.random.default_rng(7)
    for lead in LEADING:
        sess = session(k, len(lead) + 1)
        a = rng.standard_normal((*lead, k)).astype(np.float32)
        (y,) = sess.run(None, {"A": a, **feeds})
        expect = a.astype(np.float64) @ dense.T
        assert y.shape == (*lead, n) and y.dtype == np.float32
        if expect.size:
            err = np.max(np.abs(y - expect)) / np.max(np.abs(expect))
            assert err < 1e-5, f"{path} path, A {a.shape}, W [{n}, {k}]: relative error {err:.2e}"


def test_serial_pool_matches(path: str) -> None:
    """One intra-op thread (no pool to split over) gives the same numbers as two."""
    n, k = 960, 576
    feeds = lut_kernel.lut_layout(*blocks(n, k, seed=3))
    a = np.random.default_rng(4).standard_normal((3, k)).astype(np.float32)
    for rows in (a[:1], a):
        one = session(k, 2, threads=1).run(None, {"A": rows, **feeds})[0]
        two = session(k, 2, threads=2).run(None, {"A": rows, **feeds})[0]
        np.testing.assert_array_equal(one, two)


def test_paths_agree(library: Path) -> None:
    """The AVX-512 and scalar paths build identical tables; their sums differ only by fma rounding."""
    n, k = 576, 1536
    feeds = lut_kernel.lut_layout(*blocks(n, k, seed=5))
    a = np.random.default_rng(6).standard_normal((2, k)).astype(np.float32)
    old = os.environ.pop(lut_kernel.SCALAR_ENV, None)
    try:
        native = session(k, 2).run(None, {"A": a, **feeds})[0]
        os.environ[lut_kernel.SCALAR_ENV] = "1"
        scalar = session(k, 2).run(None, {"A": a, **feeds})[0]
    finally:
        os.environ.pop(lut_kernel.SCALAR_ENV, None)
        if old is not None:
            os.environ[lut_kernel.SCALAR_ENV] = old
    np.testing.assert_allclose(native, scalar, rtol=0, atol=1e-5 * np.max(np.abs(scalar)))


def test_wrong_activation_width_names_a(library: Path) -> None:
    n, k = 16, 64
    feeds = lut_kernel.lut_layout(*blocks(n, k, seed=1))
    sess = session(k + 32, 2)  # the graph says nothing binding about W: the kernel must catch it
    with pytest.raises(Exception, match=r"input A .*K = 64"):
        sess.run(None, {"A": np.ones((1, k + 32), np.float32), **feeds})


@pytest.mark.parametrize(("name", "shape"), [("W", (1, 2, 4, 8)), ("W", (1, 2, 64)), ("D", (1, 2, 8)),
                                             ("Mn", (2, 2, 16))])
def test_bad_weight_shapes_name_the_input(library: Path, name: str, shape: tuple[int, ...]) -> None:
    n, k = 16, 64
    feeds = lut_kernel.lut_layout(*blocks(n, k, seed=2))
    feeds[name] = np.zeros(shape, feeds[name].dtype)
    sess = session(k, 2)
    with pytest.raises(Exception, match=rf"input {name} must have shape"):
        sess.run(None, {"A": np.ones((1, k), np.float32), **feeds})


def test_lut_layout_rejects_bad_blocks() -> None:
    q, d, m = blocks(16, 64, seed=0)
    with pytest.raises(ValueError, match="N % 16"):
        lut_kernel.lut_layout(q[:8], d[:8], m[:8])
    with pytest.raises(ValueError, match="above 15"):
        lut_kernel.lut_layout(q + 16, d, m)
