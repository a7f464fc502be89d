"""Default sampling of a model version, recorded in its registry manifest under ``"sampling"``.

A request's explicit values always win; these fill what it leaves unset (generation reads them
from the manifest of the version that answers, so a rollout can change them with the model).

Chosen by measurement through the pipeline's hidden instructions, on the 45 prompts of
``model.answer_quality`` (keyword hits; answers repeating a trigram > 3 times), 3 seeds where
sampled. The old default (temperature 0.7, top_p 1, no guard) on the builder's int4: 7-10/45.
On the served build (float32 activations; its answers equal fp32's): temperature 0.2 + top_p 0.9
(the SmolLM2 authors' suggestion) with a repetition penalty of 1.1: 24-27/45; greedy: 30/45;
greedy + 1.05: 29/45; greedy + 1.1: 28/45, no loops. On the int8-activation build: 0.2 + top_p
0.9 24-28/45 with 2-3 loops (27-31/45, no loop, with the penalty); greedy 30/45 with a loop;
greedy + 1.1 34/45, no loop. So one answer is greedy, with the penalty as the guard against
degenerate loops ("Bonjour, bonjour! ..." to max_tokens): the distinct tokens among the answer's
last ``repetition_window`` tokens are penalized, 1.1 as llama.cpp's default. Several candidates
(``n`` > 1, for comparisons) must differ, so they sample at 0.2 with top_p 0.9.

The copy guard (``copy_*``, :mod:`services.generation.repeats`) is the other half: against an
answer copying an *earlier* answer of the conversation, which the model did in 30 of 36 follow-up
answers (a run of 8+ tokens; whole 64-token answers) before it; with llama.cpp's DRY values
(0.8, base 1.75, 2 tokens free) matched against earlier answers only: 1 of 36, and the 45
prompts asked as turn 3 scored 22/45 instead of 17/45 (bench/results/answer_copies.md).
Versions recorded before the guard get these values (``runner.sampling_defaults``).
"""

from __future__ import annotations

from typing import Any

SMOLLM2_135M_INSTRUCT: dict[str, Any] = {
    "temperature": 0.0,
    "candidates_temperature": 0.2,  # when a request asks for n > 1 answers
    "top_p": 0.9,
    "top_k": 50,
    "repetition_penalty": 1.1,
    "repetition_window": 64,
    # services.generation.repeats: continuing a copy of an earlier answer costs
    # copy_penalty x copy_base^(length - copy_allowed) logits; 0 = off
    "copy_penalty": 0.8,
    "copy_base": 1.75,
    "copy_allowed": 2,
}
COPY_KEYS = ("copy_penalty", "copy_base", "copy_allowed")

MANIFEST_KEY = "sampling"


def defaults_for(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """A version's defaults: its manifest's, else (older versions) the base model's."""
    recorded = (manifest or {}).get(MANIFEST_KEY)
    return dict(recorded) if isinstance(recorded, dict) else dict(SMOLLM2_135M_INSTRUCT)
