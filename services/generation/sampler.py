"""Choosing the next token from one row of logits.

Per candidate and independent of the batch: an answer depends only on the prompt ids, the
sampling options and the seed, never on which rows shared its forward pass.
Order as in HF: repetition penalty, temperature, top_k, top_p.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def apply_repetition_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL/HF penalty on the distinct `recent` tokens: logit/penalty if positive, logit*penalty if not.

    Returns a new array when it changes anything (the bound logits buffer is reused by the next
    pass), `logits` itself when off.
    """
    if penalty == 1.0 or not recent:
        return logits
    out = np.array(logits, dtype=np.float32, copy=True)
    idx = np.unique(np.asarray(recent, dtype=np.int64))
    v = out[idx]
    out[idx] = np.where(v > 0, v / penalty, v * penalty)
    return out


def sample_token(logits: np.ndarray, temperature: float, top_p: float, top_k: int,
                 rng: np.random.Generator) -> int:
    """One token drawn from `logits` (one row): temperature, then top_k, then top_p (nucleus)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    idx = np.argpartition(z, -top_k)[-top_k:] if 0 < top_k < z.size else np.arange(z.size)
    v = z[idx] / temperature
    order = np.argsort(-v, kind="stable")
    idx, v = idx[order], v[order]
    p = np.exp(v - v[0])
    p /= p.sum()
    if top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        idx, p = idx[:cut], p[:cut] / p[:cut].sum()
    return int(idx[min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), len(idx) - 1)])


def _order_keys(row: np.ndarray) -> np.ndarray:
    """int16 keys in the order of a float16 row's values (a new array): sign-magnitude bits made
    two's-complement. NumPy compares float16 in software (~9 ms for 32 x 49152) and converting
    to float32 first costs ~3 ms; integer keys cost ~0.3 ms. -0 sorts below +0 (never a logit max)."""
    bits = row.view(np.int16)
    return bits ^ ((bits >> 15) & np.int16(0x7FFF))


def greedy_float16(row: np.ndarray, penalty: float, recent: Sequence[int]) -> int:
    """argmax (first of ties) of a float16 row after the repetition penalty, equal to converting
    the row to float32 and penalizing it, but touching only the `recent` tokens in float32."""
    keys = _order_keys(row)
    if penalty == 1.0 or not recent:
        return int(np.argmax(keys))
    idx = np.unique(np.asarray(recent, dtype=np.int64))
    v = row[idx].astype(np.float32)
    penalized = np.where(v > 0, v / penalty, v * penalty)
    keys[idx] = np.iinfo(np.int16).min
    rest = int(np.argmax(keys))
    k = int(np.argmax(penalized))  # idx ascending: the first of ties among the penalized
    best, other = penalized[k], np.float32(row[rest])
    return int(idx[k]) if best > other or (best == other and idx[k] < rest) else rest


def next_token(logits: np.ndarray, *, temperature: float, top_p: float, top_k: int,
               penalty: float, recent: Sequence[int], rng: np.random.Generator | None) -> int:
    """The candidate's next token: greedy (argmax, first of ties, like ORT GenAI) or sampled.

    A float16 row (a GPU build's logits) is read as it is when greedy, else converted."""
    greedy = temperature <= 0 or rng is None
    if logits.dtype == np.float16:
        if greedy:
            return greedy_float16(logits, penalty, recent)
        logits = logits.astype(np.float32)
    z = apply_repetition_penalty(logits, recent, penalty)
    if greedy:
        return int(np.argmax(z))
    return sample_token(z, temperature, top_p, top_k, rng)
