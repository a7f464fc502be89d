"""runner._float32_session on the small carried graph of tests/model: a session over the copy, and
None (the quantized graph serves alone) when the copy cannot be built or has nothing to unpack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.carry_blocks import carry
from services.generation.runner import _float32_session
from tests.model.test_carry_blocks_graph import HIDDEN, _builder_like, _source


@pytest.fixture
def carried(tmp_path: Path) -> Path:
    _builder_like(tmp_path / "src")
    source, _ = _source()
    carry(tmp_path / "src", tmp_path / "out", source, accuracy_level=0)
    return tmp_path / "out" / "model.onnx"


def _options() -> object:
    import onnxruntime as ort

    return ort.SessionOptions()


def test_the_copy_serves_and_leaves_no_file_behind(carried: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    session = _float32_session(carried, _options(), ["CPUExecutionProvider"])
    assert session is not None
    assert [n for n in (tmp_path / "tmp").iterdir()] == []  # the temporary files are gone
    x = np.random.default_rng(0).normal(size=(1, 3, HIDDEN)).astype(np.float32)
    quantized = ort.InferenceSession(str(carried), providers=["CPUExecutionProvider"])
    want = quantized.run(None, {"x": x})[0]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_a_failed_build_leaves_the_quantized_graph_alone(carried: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    import onnx

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    assert _float32_session(carried, _options(), ["CPUExecutionProvider"]) is None
    assert "building it failed" in caplog.text


def test_a_float32_graph_gets_no_copy(tiny_model_dir: Path) -> None:
    assert _float32_session(tiny_model_dir / "model.onnx", _options(), ["CPUExecutionProvider"]) is None
