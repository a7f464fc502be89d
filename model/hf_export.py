"""GGUF -> float32 Hugging Face checkpoint (and tokenizer files).

``transformers`` dequantizes the GGUF, but refuses ``save_pretrained`` on a
GGUF-loaded model, so the state dict, config and tokenizer files are written
here by hand, in a canonical form (sorted JSON keys, fixed safetensors
metadata) so the same GGUF gives the same bytes on every machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from model.chat_template import CHATML_TEMPLATE

# The LlamaConfig fields that define the model; anything else describes the loader.
_CONFIG_KEYS = ("attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "head_dim",
                "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
                "max_position_embeddings", "mlp_bias", "model_type", "num_attention_heads",
                "num_hidden_layers", "num_key_value_heads", "pad_token_id", "pretraining_tp",
                "rms_norm_eps", "tie_word_embeddings", "vocab_size")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def write_json(path: Path, value: Any) -> None:
    """Canonical JSON (sorted keys, 2-space indent, trailing newline) for stable hashes."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def tokenizer_config() -> dict[str, Any]:
    """The tokenizer config of SmolLM2-Instruct (GPT-2 BPE, ChatML, ``<|im_end|>`` ends turns).

    ``GPT2Tokenizer`` is the class ONNX Runtime GenAI's tokenizer and both
    transformers 4 and 5 understand; the chat template is embedded as well
    as written to ``chat_template.jinja`` because older readers look only here.
    """
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": "<|im_start|>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 8192,
        "pad_token": "<|im_end|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
        "vocab_size": 49152,
    }


def export_tokenizer(gguf: Path, out_dir: Path) -> None:
    """Write tokenizer.json (converted from the GGUF by transformers) and our configs.

    The GGUF's own chat template must equal ours: the renderer in
    ``model.chat_template`` is tested against it, so a mismatch means the
    source changed.
    """
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.chat_template != CHATML_TEMPLATE:
        raise ValueError("the GGUF's chat template differs from model.chat_template.CHATML_TEMPLATE")
    backend = tok.backend_tokenizer
    raw = json.loads(backend.to_str())
    write_json(out_dir / "tokenizer.json", raw)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    write_json(out_dir / "special_tokens_map.json", {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
    })
    (out_dir / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")


def clean_config(config: dict[str, Any]) -> dict[str, Any]:
    """A loadable float32 LlamaForCausalLM config: architectures set, loader keys dropped.

    Only the fields that define the model are kept, and RoPE is written both
    the transformers 4 way (``rope_theta``) and the 5 way (``rope_parameters``),
    so the file does not depend on which transformers wrote it.
    """
    out = {k: config[k] for k in _CONFIG_KEYS if k in config}
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    out["rope_theta"] = theta
    out["rope_parameters"] = {"rope_theta": theta, "rope_type": rope.get("rope_type", "default")}
    out["rope_scaling"] = None
    out["architectures"] = ["LlamaForCausalLM"]
    out["torch_dtype"] = "float32"
    out["use_cache"] = True
    return out


def generation_config() -> dict[str, Any]:
    """Generation defaults: ``<|im_end|>`` (id 2) stops an answer."""
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def save_checkpoint(model: Any, out_dir: Path) -> None:
    """Save a (possibly tied) causal LM as model.safetensors + config.json.

    The tied ``lm_head.weight`` is left out, as ``save_pretrained`` would,
    because safetensors refuses shared storage and the config re-ties it.
    """
    from safetensors.torch import save_file

    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = {
        name: tensor.detach().to("cpu").contiguous().clone()
        for name, tensor in state.items()
        if not (tied and name == "lm_head.weight")
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_json(out_dir / "config.json", clean_config(model.config.to_dict()))
    write_json(out_dir / "generation_config.json", generation_config())


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    """Copy the tokenizer files next to a checkpoint (hard links would share inodes across steps)."""
    for name in TOKENIZER_FILES:
        data = (tokenizer_dir / name).read_bytes()
        (out_dir / name).write_bytes(data)


def export_hf_fp32(gguf: Path, tokenizer_dir: Path, out_dir: Path) -> None:
    """Dequantize the GGUF to a float32 LlamaForCausalLM checkpoint in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    save_checkpoint(model, out_dir)
    copy_tokenizer(tokenizer_dir, out_dir)
