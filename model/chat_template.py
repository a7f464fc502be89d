"""ChatML prompt rendering, identical to SmolLM2-Instruct's own chat template.

A pure function with no dependencies: the tokenizer and prompt services render
prompts with it, and ``tests/model`` proves it matches what transformers'
``apply_chat_template`` produces from the model's Jinja template.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# The Jinja template shipped in the model's GGUF (``tokenizer.chat_template``).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_chatml(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True,
                  default_system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """Render ``messages`` ({"role", "content"}) as the model expects to see them.

    Like the model's template, a conversation that does not start with a
    system message gets the default one; ``add_generation_prompt`` opens the
    assistant's turn so the model writes the answer next.
    """
    parts: list[str] = []
    for index, message in enumerate(messages):
        role = message["role"]
        if index == 0 and role != "system":
            parts.append(f"{IM_START}system\n{default_system}{IM_END}\n")
        parts.append(f"{IM_START}{role}\n{message['content']}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)
