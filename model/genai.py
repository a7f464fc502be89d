"""Thin helpers over ONNX Runtime GenAI: load a model dir, greedy-generate with timings.

Quality checks, tests and benchmarks all decode the same way, so the numbers
they report are comparable: greedy search, batch 1, prefill timed separately
from the per-token decode loop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from model.chat_template import render_chatml


@dataclass(frozen=True)
class Generation:
    """One greedy generation: the text, token counts and the time each phase took."""

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of the decode loop (the first token comes from the prefill)."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second of the prefill."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


def read_genai_config(model_dir: Path) -> dict[str, Any]:
    """The model's ``genai_config.json``."""
    return json.loads((Path(model_dir) / "genai_config.json").read_text(encoding="utf-8"))


def load(model_dir: Path, provider: str | None = None) -> tuple[Any, Any]:
    """``(og.Model, og.Tokenizer)`` for ``model_dir``.

    ``provider`` None keeps what the model's config asks for; ``"cpu"``
    clears the providers so a CUDA-targeted build still runs on a CPU-only
    machine; ``"cuda"`` asks for CUDA explicitly.
    """
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if provider is not None:
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
    model = og.Model(config)
    return model, og.Tokenizer(model)


def greedy(model: Any, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int,
           stop_at_eos: bool = True) -> Generation:
    """Greedy-decode up to ``max_new_tokens`` tokens after ``prompt_ids``.

    With ``stop_at_eos`` False the loop runs to exactly ``max_new_tokens``
    tokens (``min_length`` pins it), so benchmarks compare equal work.
    """
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt_ids) + max_new_tokens
    options: dict[str, Any] = {"max_length": total, "do_sample": False}
    if not stop_at_eos:
        options["min_length"] = total
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(list(prompt_ids))
    generator.generate_next_token()
    out = [int(generator.get_next_tokens()[0])]
    prefill_end = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    end = time.perf_counter()
    eos = set(tokenizer.eos_token_ids) if stop_at_eos else set()
    text_ids = [t for t in out if t not in eos]
    return Generation(text=tokenizer.decode(text_ids), prompt_tokens=len(prompt_ids),
                      new_tokens=len(out), prefill_s=prefill_end - start,
                      decode_s=end - prefill_end)


class ReferenceStep(NamedTuple):
    """One greedy step of the reference: the token it chose and the next best tokens with how far below its
    logit theirs were (a small gap is a near tie that rounding elsewhere may flip)."""

    token: int
    gaps: dict[int, float]


def reference_steps(model: Any, ids: Sequence[int], max_tokens: int, eos: frozenset[int],
                    runners_up: int = 4) -> list[ReferenceStep]:
    """ORT GenAI's Generator, batch 1, greedy, with each step's `runners_up` next best tokens: the
    reference against which the engine's exactness is judged (tests and bench.gpu_engine)."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(list(ids))
    out: list[ReferenceStep] = []
    while not gen.is_done() and len(out) < max_tokens:
        logits = np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1)
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        if logits.max() > logits[token]:  # guards the gaps below: they assume greedy took the argmax
            raise RuntimeError(f"Generator chose {token}, not its logits' argmax {int(logits.argmax())}")
        best = [int(t) for t in np.argsort(logits)[::-1][:runners_up + 1] if int(t) != token][:runners_up]
        out.append(ReferenceStep(token, {t: float(logits[token] - logits[t]) for t in best}))
        if token in eos:
            break
    return out


def reference_ids(model: Any, ids: Sequence[int], max_tokens: int, eos: frozenset[int]) -> list[int]:
    """The reference answer's token ids (EOS included): :func:`reference_steps`' tokens."""
    return [s.token for s in reference_steps(model, ids, max_tokens, eos)]


def chat(model: Any, tokenizer: Any, messages: Sequence[Mapping[str, str]],
         max_new_tokens: int = 64) -> Generation:
    """Answer a conversation: render ChatML, encode, greedy-decode until ``<|im_end|>``."""
    prompt = render_chatml(messages, add_generation_prompt=True)
    ids = [int(t) for t in tokenizer.encode(prompt)]
    return greedy(model, tokenizer, ids, max_new_tokens)
