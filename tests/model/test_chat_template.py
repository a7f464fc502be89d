"""Our ChatML renderer equals the model's own Jinja chat template."""

from __future__ import annotations

import pytest

from model.chat_template import CHATML_TEMPLATE, DEFAULT_SYSTEM_PROMPT, render_chatml

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "I have a dog called Biscuit."},
     {"role": "assistant", "content": "Nice name!"},
     {"role": "user", "content": "What is my dog's name?"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Ünïcödé, \"quotes\", {{ braces }} and\nnew lines"}],
    [],
]


def jinja_render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Render with the template itself, the way transformers does (sandboxed Jinja2)."""
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        undefined=jinja2.StrictUndefined)
    return env.from_string(CHATML_TEMPLATE).render(messages=messages,
                                                   add_generation_prompt=add_generation_prompt)


def test_multi_turn_exact_string() -> None:
    assert render_chatml(CONVERSATIONS[0]) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nI have a dog called Biscuit.<|im_end|>\n"
        "<|im_start|>assistant\nNice name!<|im_end|>\n"
        "<|im_start|>user\nWhat is my dog's name?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_default_system_prompt_added() -> None:
    text = render_chatml([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n")


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_jinja_template(messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
    assert render_chatml(messages, add_generation_prompt) == jinja_render(messages,
                                                                         add_generation_prompt)


def test_tiny_model_tokenizer_template_matches(tiny_model_dir) -> None:
    """ONNX Runtime GenAI's own template engine, on the shipped tokenizer files, agrees."""
    import json

    from model.genai import load

    _, tokenizer = load(tiny_model_dir, "cpu")
    for messages in CONVERSATIONS[:3]:
        ours = render_chatml(messages, add_generation_prompt=True)
        theirs = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        assert theirs == ours
