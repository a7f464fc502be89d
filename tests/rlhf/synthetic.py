"""A small comparison dataset whose preference is learnable, ranked by the real preference rule."""

from __future__ import annotations

import uuid
from pathlib import Path

import yaml

from model.chat_template import render_chatml
from rlhf import preference

PROMPTS = Path(__file__).resolve().parents[2] / "rlhf" / "prompts.yaml"


def questions(part: str = "train") -> list[str]:
    return list(yaml.safe_load(PROMPTS.read_text(encoding="utf-8"))[part])


def candidates(question: str) -> list[str]:
    """A concise on-topic sentence, a short unfinished fragment and a long repetitive ramble."""
    topic = [w for w in preference.words(question) if len(w) >= 3 and w not in preference.STOP_WORDS]
    subject = " ".join(topic) or "that"
    return [
        f"Well, I think that it goes on and on and on and on and on and on and on and on and on {subject}",
        f"Maybe it depends on {topic[0] if topic else 'it'}",
        f"In short, {subject} is explained simply here.",
    ]


def base_row(question: str, created_ms: int, **fields: object) -> dict:
    return {"feedback_id": uuid.uuid4().hex, "user_id": "labeler", "conversation_id": uuid.uuid4().hex,
            "turn_index": 1, "prompt": render_chatml([{"role": "user", "content": question}]),
            "answer_finish_reasons": [], "comment": "", "model_version": "tiny", "template_version": "v1",
            "source": "simulated", "created_unix_ms": created_ms, "rating_answer_index": None, "thumbs_up": None,
            "ranking": None, **fields}


def ranking_rows(qs: list[str], created_ms: int) -> list[dict]:
    """One ranking per question: its three candidates ordered by ``rlhf.preference.rank``."""
    rows = []
    for i, q in enumerate(qs):
        answers = candidates(q)
        rows.append(base_row(q, created_ms + i, kind="ranking", answers=answers,
                             answer_finish_reasons=["stop"] * len(answers),
                             ranking=preference.rank(q, answers)))
    return rows
