"""The build's quality quiz (``model.quality``), answered by a torch policy while it trains.

Why: the quality gate scores an exported child only after training, and a DPO run that moved too
far fails it with nothing to fall back on (bench/results/rlhf_rounds_real.md: a child 2.2 points
under its parent on the quiz). Scoring the policy at checkpoints during training lets DPO keep the
last checkpoint still within the gate's points of its parent, like early stopping on a validation
set. The float32 torch answers are a proxy for the exported build's (batched, left-padded greedy):
parent and child are scored the same way here, and the exported child still faces the real gate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.chat_template import render_chatml
from model.quality import GATE_POINTS, MAX_NEW_TOKENS, QUESTIONS, Question, is_correct, percent, within_gate


@dataclass(frozen=True)
class QuizCheck:
    """One checkpoint's quiz result; ``passed``: within the gate's points of the parent's score."""

    step: int
    score: int
    total: int
    pct: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "score": self.score, "total": self.total, "pct": self.pct,
                "passed": self.passed}


def quiz_score(lm: nn.Module, tokenizer: Any, eos: int, device: torch.device,
               questions: Sequence[Question] = QUESTIONS, batch_size: int = 32,
               max_new_tokens: int = MAX_NEW_TOKENS, rank: int = 0, world: int = 1) -> tuple[int, int]:
    """(correct, asked) over this worker's share of ``questions`` (every ``world``-th from
    ``rank``): greedy answers to the questions as chat turns, judged like the build's quiz."""
    mine = list(questions)[rank::world]
    rows = [tokenizer.encode(render_chatml(q.messages(), add_generation_prompt=True), add_special_tokens=False).ids
            for q in mine]
    answers = greedy_texts(lm, tokenizer, eos, rows, device, batch_size, max_new_tokens)
    return sum(is_correct(text, q.accept) for q, text in zip(mine, answers, strict=True)), len(mine)


def greedy_texts(lm: nn.Module, tokenizer: Any, eos: int, rows: Sequence[Sequence[int]], device: torch.device,
                 batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers of ``lm`` to prompts given as token ids, batched and left-padded, each cut
    at its first ``eos``; the module's train/eval mode is restored."""
    texts: list[str] = []
    was_training = lm.training
    lm.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.tensor([[eos] * (width - len(r)) + list(r) for r in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=device)
            out = lm.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                              pad_token_id=eos, eos_token_id=eos)
            for answer in out[:, width:].tolist():
                texts.append(tokenizer.decode(answer[:answer.index(eos)] if eos in answer else answer))
    lm.train(was_training)
    return texts


def check(step: int, score: int, total: int, parent: QuizCheck | None, points: float = GATE_POINTS) -> QuizCheck:
    """A checkpoint's result; the parent's own check (``parent`` None) passes by definition."""
    pct = percent(score, total)
    return QuizCheck(step, score, total, pct, parent is None or within_gate(pct, parent.pct, points))


def kept_step(checks: Sequence[QuizCheck]) -> int | None:
    """The step whose weights a run keeps: its last, if it passed (or nothing was checked);
    otherwise the latest earlier checkpoint that passed; None when no checkpoint passed (the
    run keeps its last weights and the exported child meets the gate's refusal)."""
    if not checks or checks[-1].passed:
        return checks[-1].step if checks else None
    passed = [c.step for c in checks if c.passed]
    return passed[-1] if passed else None
