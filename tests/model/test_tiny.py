"""The tiny random model builds through the real builder path and generates through ORT GenAI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.chat_template import render_chatml
from model.genai import chat, greedy, load, read_genai_config
from model.registry import Registry
from model.steps import read_stamp, up_to_date
from model.tiny import TINY_CONFIG, TINY_SOURCE, publish_tiny


def test_tiny_layout_matches_the_real_model(tiny_model_dir: Path) -> None:
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (tiny_model_dir / name).is_file(), name
    config = read_genai_config(tiny_model_dir)["model"]
    assert config["type"] == "llama"
    assert config["vocab_size"] == 49152
    assert config["eos_token_id"] == 2
    assert config["decoder"]["num_hidden_layers"] == TINY_CONFIG["num_hidden_layers"]
    assert config["decoder"]["hidden_size"] == TINY_CONFIG["hidden_size"]
    size = sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    assert size < 40_000_000  # tiny next to the real model's 540 MB


def test_tiny_generates_tokens(tiny_model_dir: Path) -> None:
    model, tokenizer = load(tiny_model_dir, "cpu")
    ids = [int(t) for t in tokenizer.encode(render_chatml([{"role": "user", "content": "Hi"}]))]
    assert ids[0] == 1  # <|im_start|>, the real tokenizer
    gen = greedy(model, tokenizer, ids, 12, stop_at_eos=False)
    assert gen.new_tokens == 12
    assert gen.prompt_tokens == len(ids)
    again = greedy(model, tokenizer, ids, 12, stop_at_eos=False)
    assert again.text == gen.text  # greedy decoding is deterministic
    answer = chat(model, tokenizer, [{"role": "user", "content": "What is 2+2?"}], 8)
    assert 1 <= answer.new_tokens <= 8


def test_tokenizer_matches_tokenizers_library(tiny_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    _, tokenizer = load(tiny_model_dir, "cpu")
    reference = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    for text in ["Hello, world!", "Ünïcode 🙂 x=1\n\tindent"]:
        ids = [int(t) for t in tokenizer.encode(text)]
        assert ids == reference.encode(text).ids
        assert tokenizer.decode(ids) == text
    chat_text = render_chatml([{"role": "user", "content": "Hi"}])
    ids = [int(t) for t in tokenizer.encode(chat_text)]
    assert ids == reference.encode(chat_text).ids
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> / <|im_end|> are single tokens


def test_tiny_build_is_cached(tiny_model_dir: Path) -> None:
    stamp = read_stamp(tiny_model_dir)
    assert stamp is not None
    assert up_to_date(tiny_model_dir, stamp["inputs"]) is not None
    recorded = set(stamp["outputs"])
    assert {"model.onnx", "model.onnx.data"} <= recorded


def test_tiny_publishes_into_registry(tiny_model_dir: Path, tmp_path: Path) -> None:
    version = publish_tiny(tmp_path / "reg", tiny_model_dir)
    assert publish_tiny(tmp_path / "reg", tiny_model_dir) == version  # idempotent
    registry = Registry(tmp_path / "reg")
    loaded = registry.load(version)
    assert loaded.manifest["source"] == TINY_SOURCE
    assert loaded.manifest["precision"] == "fp32"
    assert json.loads((loaded.path / "genai_config.json").read_text())["model"]["vocab_size"] == 49152
    model, tokenizer = load(loaded.path, "cpu")
    assert greedy(model, tokenizer, [1, 2, 3], 4, stop_at_eos=False).new_tokens == 4


def test_model_bytes_do_not_depend_on_the_checkout(tiny_model_dir: Path) -> None:
    """The builder would stamp the enclosing git checkout's commit; ours carries the wheel's."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime_genai

    proto = onnx.load(str(tiny_model_dir / "model.onnx"), load_external_data=False)
    commit = getattr(onnxruntime_genai, "__commit__", "")
    assert proto.producer_version == f"{onnxruntime_genai.__version__}+{commit[:7]}"
