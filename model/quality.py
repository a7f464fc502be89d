"""A small factual QA check, run on every build and recorded in its manifest.

Quantization costs answers (DESIGN.md, "The model"), so every build is scored
on the same short questions with known answers: greedy decoding through the
chat template, and a case-insensitive substring match against the accepted
answers. Two of the questions (Italy, Spain) are ones the float32 model gets
wrong too; they stay so the check is not tuned to the reference. One question
needs the conversation history (DESIGN.md's dog called Biscuit): the product
feeds the whole conversation back every turn, and quantization is known to cost
exactly this. The decode speed seen during the check is recorded too, so each
build has both numbers.

``python -m model.quality MODEL_DIR`` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.hashing import digest_json


@dataclass(frozen=True)
class Question:
    """A question, the substrings any one of which makes an answer right, and earlier turns."""

    prompt: str
    accept: tuple[str, ...]
    history: tuple[tuple[str, str], ...] = ()  # (user, assistant) turns before the question

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages, ending with the question."""
        out = []
        for user, assistant in self.history:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return [*out, {"role": "user", "content": self.prompt}]


QUESTIONS: tuple[Question, ...] = (
    Question("What is the capital of France?", ("Paris",)),
    Question("What is the capital of Germany?", ("Berlin",)),
    Question("What is the capital of Italy?", ("Rome",)),
    Question("What is the capital of Spain?", ("Madrid",)),
    Question("What is the capital of Japan?", ("Tokyo",)),
    Question("What is the capital of the United Kingdom?", ("London",)),
    Question("What is the capital of Egypt?", ("Cairo",)),
    Question("What is the capital of Canada?", ("Ottawa",)),
    Question("Which planet is known as the Red Planet?", ("Mars",)),
    Question("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    Question("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    Question("What is the largest ocean on Earth?", ("Pacific",)),
    Question("What is my dog's name?", ("Biscuit",),
             history=(("I have a dog called Biscuit.", "That is a lovely name for a dog!"),)),
)
MAX_NEW_TOKENS = 48
WARMUP_PROMPT = "Hello!"


def questions_digest() -> str:
    """Identity of the check itself, so a changed question set re-runs every check."""
    return digest_json({"questions": [[*q.messages(), list(q.accept)] for q in QUESTIONS],
                        "max_new_tokens": MAX_NEW_TOKENS, "scoring": "substring-casefold"})


def is_correct(answer: str, accept: tuple[str, ...]) -> bool:
    """Case-insensitive substring match against any accepted answer."""
    folded = answer.casefold()
    return any(a.casefold() in folded for a in accept)


def run_quality(model_dir: Path, provider: str | None = "cpu") -> dict[str, Any]:
    """Score ``model_dir`` on :data:`QUESTIONS`; also report decode and prefill speed.

    Returns ``{"score", "total", "per_question": [...], "decode_tok_s",
    "prefill_tok_s", "questions_digest"}``. A warm-up generation is excluded from
    the timings.
    """
    from model.genai import chat, load

    model, tokenizer = load(Path(model_dir), provider)
    chat(model, tokenizer, [{"role": "user", "content": WARMUP_PROMPT}], 8)
    per_question = []
    decode_tokens = prompt_tokens = 0
    decode_s = prefill_s = 0.0
    for question in QUESTIONS:
        gen = chat(model, tokenizer, question.messages(), MAX_NEW_TOKENS)
        per_question.append({"question": question.prompt, "accept": list(question.accept),
                             "answer": gen.text, "correct": is_correct(gen.text, question.accept)})
        decode_tokens += max(gen.new_tokens - 1, 0)
        decode_s += gen.decode_s
        prompt_tokens += gen.prompt_tokens
        prefill_s += gen.prefill_s
    return {
        "score": sum(1 for q in per_question if q["correct"]),
        "total": len(per_question),
        "per_question": per_question,
        "decode_tok_s": round(decode_tokens / decode_s, 2) if decode_s else 0.0,
        "prefill_tok_s": round(prompt_tokens / prefill_s, 2) if prefill_s else 0.0,
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
