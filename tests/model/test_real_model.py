"""Checks on the real SmolLM2 build; they skip (with the command to run) when it is absent.

CI builds the model first (``make model``), so there these always run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.chat_template import render_chatml
from model.genai import chat, load
from model.registry import ModelVersion
from model.source import SOURCE_ID

pytestmark = pytest.mark.model

# Measured max |ONNX - transformers| over the prefill and 16 greedy decode steps:
# 3e-5 .. 6e-5 on logits whose magnitude reaches ~33 (relative ~2e-6). Both run
# float32; the difference is summation order in the GEMMs/attention (MLAS vs
# torch) through 30 layers. 1e-3 leaves >15x headroom yet would catch any real
# numeric change (a wrong RoPE theta, an fp16 cast, a dropped norm all give >0.1).
LOGITS_ATOL = 1e-3

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "I have a dog called Biscuit."},
    {"role": "assistant", "content": "Biscuit is a lovely name for a dog!"},
    {"role": "user", "content": "What is my dog's name?"},
]


def onnx_logit_trace(model_dir: Path, prompt_ids: list[int], steps: int) -> tuple[
        list[int], np.ndarray]:
    """Greedy-decode with ORT GenAI, keeping the logits that chose each token."""
    import onnxruntime_genai as og

    model, _ = load(model_dir, "cpu")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    rows = [np.array(generator.get_logits())[0, -1]]
    seq = list(prompt_ids)
    while True:
        generator.generate_next_token()
        seq.append(int(generator.get_next_tokens()[0]))
        if generator.is_done():  # no forward pass runs after EOS / max_length
            break
        rows.append(np.array(generator.get_logits())[0, -1])
    return seq, np.stack(rows)


def test_fp32_onnx_logits_match_transformers(hf_fp32_dir: Path, onnx_fp32_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(onnx_fp32_dir / "tokenizer.json"))
    prompt = tokenizer.encode(render_chatml(CONVERSATION)).ids
    seq, onnx_rows = onnx_logit_trace(onnx_fp32_dir, prompt, steps=16)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_fp32_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([seq])).logits[0].numpy()
    ref_rows = ref[len(prompt) - 1: len(prompt) - 1 + len(onnx_rows)]
    diff = float(np.abs(onnx_rows - ref_rows).max())
    print(f"max |onnx - transformers| logits = {diff:.3g} over {len(onnx_rows)} positions "
          f"(logit scale {float(np.abs(ref_rows).max()):.1f})")
    assert len(onnx_rows) >= 2
    assert diff < LOGITS_ATOL
    assert (onnx_rows.argmax(-1) == ref_rows.argmax(-1)).all()


@pytest.mark.parametrize(("country", "capital"), [("Japan", "Tokyo"), ("Germany", "Berlin"),
                                                ("Egypt", "Cairo")])
def test_served_default_names_capitals(served_version: ModelVersion, country: str, capital: str) -> None:
    """Questions every build answers greedy. (France is a near-tie on the int8-activation
    build, "The" against "L'" as the first token, and comes out in French; the quality gate
    judges builds on 184 questions, and the pipeline check through the hidden instructions.)"""
    model, tokenizer = load(served_version.path, "cpu")
    answer = chat(model, tokenizer, [{"role": "user", "content": f"What is the capital of {country}?"}],
                  max_new_tokens=32)
    assert capital.lower() in answer.text.lower(), answer.text


def test_served_default_manifest(served_version: ModelVersion) -> None:
    manifest: dict[str, Any] = served_version.manifest
    assert manifest["source"] == SOURCE_ID
    assert manifest["execution_provider"] == "cpu"
    quality = manifest["quality"]
    assert quality["total"] >= 150 and quality["score"] >= quality["total"] // 2
    assert manifest["sampling"]["repetition_penalty"] > 1.0  # the loop guard travels with the model
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
            "chat_template.jinja"} <= set(manifest["files"])


def test_registry_chat_template_matches_transformers(served_version: ModelVersion) -> None:
    """Our renderer == transformers' apply_chat_template on the registry model's tokenizer."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(served_version.path))
    expected = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert render_chatml(CONVERSATION, add_generation_prompt=True) == expected
    no_system = CONVERSATION[1:]
    expected = tok.apply_chat_template(no_system, tokenize=False, add_generation_prompt=True)
    assert render_chatml(no_system, add_generation_prompt=True) == expected
    # and ORT GenAI's tokenizer (what the generation service uses) renders it the same way
    _, og_tok = load(served_version.path, "cpu")
    rendered = og_tok.apply_chat_template(json.dumps(CONVERSATION), add_generation_prompt=True)
    assert rendered == render_chatml(CONVERSATION)


def test_registry_tokenizer_matches_transformers(served_version: ModelVersion) -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(served_version.path))
    _, og_tok = load(served_version.path, "cpu")
    text = render_chatml(CONVERSATION)
    assert [int(t) for t in og_tok.encode(text)] == tok(text, add_special_tokens=False)["input_ids"]
