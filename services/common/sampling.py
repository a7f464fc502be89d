"""Range checks of `colloquy.v1.SamplingParams`, shared by the gateway and generation.

Both front doors (the gateway's Chat and generation's own Generate) accept the same message, so
they must refuse the same values with the same words. Unset model-dependent fields (temperature,
top_p, top_k, repetition_penalty, copy_penalty) stay unset here: the model version that answers supplies them.
"""

from __future__ import annotations

import math

from colloquy.v1 import common_pb2

MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_TOP_K = 1000
REPETITION_PENALTY_RANGE = (1.0, 2.0)
COPY_PENALTY_RANGE = (0.0, 5.0)
# KV positions a generation slot holds (prompt + answer), GENERATION_SLOT_TOKENS: generation refuses
# a longer prompt, so the prompt stage reads the same setting and fits every prompt inside it.
SLOT_TOKENS_ENV = "GENERATION_SLOT_TOKENS"
SLOT_TOKENS_DEFAULT = 2048


def check(p: common_pb2.SamplingParams, *, max_tokens_limit: int, max_n: int) -> None:
    """Raise ValueError("sampling.<field>: ...") for the first value outside its documented range."""
    if p.HasField("temperature") and not (math.isfinite(p.temperature) and 0 <= p.temperature <= 2):
        raise ValueError(f"sampling.temperature: {p.temperature} is outside [0, 2]")
    if p.HasField("top_p") and not (math.isfinite(p.top_p) and 0 < p.top_p <= 1):
        raise ValueError(f"sampling.top_p: {p.top_p} is outside (0, 1]")
    if p.HasField("top_k") and p.top_k > MAX_TOP_K:
        raise ValueError(f"sampling.top_k: {p.top_k} is outside [0, {MAX_TOP_K}]")
    lo, hi = REPETITION_PENALTY_RANGE
    if p.HasField("repetition_penalty") and not (
            math.isfinite(p.repetition_penalty) and lo <= p.repetition_penalty <= hi):
        raise ValueError(f"sampling.repetition_penalty: {p.repetition_penalty} is outside [{lo:g}, {hi:g}]")
    lo, hi = COPY_PENALTY_RANGE
    if p.HasField("copy_penalty") and not (math.isfinite(p.copy_penalty) and lo <= p.copy_penalty <= hi):
        raise ValueError(f"sampling.copy_penalty: {p.copy_penalty} is outside [{lo:g}, {hi:g}]")
    if p.HasField("max_tokens") and not 1 <= p.max_tokens <= max_tokens_limit:
        raise ValueError(f"sampling.max_tokens: {p.max_tokens} is outside [1, {max_tokens_limit}]")
    if p.HasField("n") and not 1 <= p.n <= max_n:
        raise ValueError(f"sampling.n: {p.n} is outside [1, {max_n}]")
    if len(p.stop) > MAX_STOP:
        raise ValueError(f"sampling.stop: {len(p.stop)} strings, at most {MAX_STOP}")
    for i, s in enumerate(p.stop):
        if not s or len(s) > MAX_STOP_CHARS or "\x00" in s:
            raise ValueError(f"sampling.stop[{i}]: must be 1..{MAX_STOP_CHARS} characters, no NUL")
