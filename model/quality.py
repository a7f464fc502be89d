"""The build's quality gate: short questions with checkable answers, scored greedy for every build.

Quantization costs answers (DESIGN.md, "The model"; issue 14 saw the builder's int4 fall from
fp32's 14/16 to 7/16 on a capitals quiz while a 13-question check scored both 11/13), so the
gate needs enough questions to see a loss of a few percent: the set in
:mod:`model.quality_questions` (capitals, arithmetic, unit conversions, opposites, simple
facts, one-step instructions, and questions that need the conversation history). Each
question is answered once, greedy, through the chat template, with a short token budget that
ends at ``<|im_end|>``; an answer is right when it contains any accepted answer on word
boundaries (:func:`is_correct`). The score is kept as a count and a percent, with the
16-question capitals quiz of the model notes alongside; :func:`within_gate` is the rule a
build must meet against the float32 reference. Some questions stay that the float32 model
gets wrong too, so the check is not tuned to the reference. The decode speed seen during the
check is recorded too, so each build has both numbers.

``python -m model.quality MODEL_DIR`` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from model.hashing import digest_json
from model.quality_questions import CAPITALS_16, QUESTIONS, Question

__all__ = ["CAPITALS_16", "GATE_POINTS", "MAX_NEW_TOKENS", "QUESTIONS", "Question", "is_correct",
           "percent", "questions_digest", "run_quality", "same_answers", "within_gate"]

MAX_NEW_TOKENS = 32  # short answers come first; the loop stops at <|im_end|> before this
WARMUP_PROMPT = "Hello!"
GATE_POINTS = 2.0  # a build may score at most this many percentage points below the reference
SCORING = "casefold-word-boundary-v2"


def questions_digest() -> str:
    """Identity of the check itself, so a changed question set or scoring re-runs every check."""
    return digest_json({"questions": [[*q.messages(), list(q.accept), q.category] for q in QUESTIONS],
                        "max_new_tokens": MAX_NEW_TOKENS, "scoring": SCORING})


@lru_cache(maxsize=1024)
def _pattern(accepted: str) -> re.Pattern[str]:
    """Regex for one accepted answer: its words in order, any punctuation or space between them,
    and no letter, digit or decimal part on either side ("12" is not in "120" nor in "1.25")."""
    words = [re.escape(w) for w in re.split(r"\W+", accepted.casefold()) if w]
    body = r"\W+".join(words) if words else re.escape(accepted.casefold())
    return re.compile(rf"(?<!\w)(?<!\d[.,]){body}(?!\w)(?![.,]\d)")


def is_correct(answer: str, accept: Iterable[str]) -> bool:
    """True when ``answer`` contains any accepted answer, case-insensitively, on word boundaries.

    Whole words so a number never matches inside a bigger one; punctuation and spacing between
    words are free so "1, 2, 3" matches "1 2 3" and "New Delhi." matches "New Delhi".
    """
    folded = answer.casefold()
    return any(_pattern(a).search(folded) for a in accept)


def percent(score: int, total: int) -> float:
    """``score`` of ``total`` as a percent rounded to 2 places (0 for an empty set)."""
    return round(100.0 * score / total, 2) if total else 0.0


def same_answers(result: dict[str, Any], reference: dict[str, Any]) -> int:
    """How many of ``result``'s answers equal ``reference``'s, question by question (both greedy
    runs of this check: the same text is the same tokens)."""
    return sum(a["answer"] == b["answer"]
               for a, b in zip(result["per_question"], reference["per_question"], strict=True))


def within_gate(score_pct: float, reference_pct: float, points: float = GATE_POINTS) -> bool:
    """True when a build's score (percent) is at most ``points`` percentage points below the
    reference's (the float32 build's); scoring above the reference passes too.

    The served default is the fastest CPU build that passes this against fp32 (issue 14).
    A tiny tolerance keeps a loss of exactly ``points`` (e.g. 3 of 150 questions) inside.
    """
    return score_pct >= reference_pct - points - 1e-9


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    score = sum(1 for r in rows if r["correct"])
    return {"score": score, "total": len(rows), "pct": percent(score, len(rows))}


def run_quality(model_dir: Path, provider: str | None = "cpu") -> dict[str, Any]:
    """Score ``model_dir`` on :data:`QUESTIONS`; also report decode and prefill speed.

    Returns ``{"score", "total", "score_pct", "capitals_16": {"score", "total", "pct"},
    "categories": {name: {...}}, "per_question": [...], "decode_tok_s", "prefill_tok_s",
    "wall_s", "max_new_tokens", "questions_digest"}``. A warm-up generation is excluded from
    the timings.
    """
    from model.genai import chat, load

    model, tokenizer = load(Path(model_dir), provider)
    chat(model, tokenizer, [{"role": "user", "content": WARMUP_PROMPT}], 8)
    capitals = set(CAPITALS_16)
    per_question = []
    decode_tokens = prompt_tokens = 0
    decode_s = prefill_s = 0.0
    start = time.perf_counter()
    for question in QUESTIONS:
        gen = chat(model, tokenizer, question.messages(), MAX_NEW_TOKENS)
        per_question.append({"question": question.prompt, "category": question.category,
                             "capitals_16": question in capitals, "accept": list(question.accept),
                             "answer": gen.text, "correct": is_correct(gen.text, question.accept)})
        decode_tokens += max(gen.new_tokens - 1, 0)
        decode_s += gen.decode_s
        prompt_tokens += gen.prompt_tokens
        prefill_s += gen.prefill_s
    wall_s = time.perf_counter() - start
    overall = _summary(per_question)
    categories = sorted({q["category"] for q in per_question})
    return {
        "score": overall["score"],
        "total": overall["total"],
        "score_pct": overall["pct"],
        "capitals_16": _summary([q for q in per_question if q["capitals_16"]]),
        "categories": {c: _summary([q for q in per_question if q["category"] == c]) for c in categories},
        "per_question": per_question,
        "decode_tok_s": round(decode_tokens / decode_s, 2) if decode_s else 0.0,
        "prefill_tok_s": round(prompt_tokens / prefill_s, 2) if prefill_s else 0.0,
        "wall_s": round(wall_s, 2),
        "max_new_tokens": MAX_NEW_TOKENS,
        "questions_digest": questions_digest(),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: print the quality result of one model directory as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--provider", default="cpu", help="cpu (default), cuda, or 'config'")
    args = parser.parse_args(argv)
    provider = None if args.provider == "config" else args.provider
    result = run_quality(args.model_dir, provider)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
