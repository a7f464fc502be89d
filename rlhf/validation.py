"""Rule wins on validation questions: which DPO checkpoint a run keeps (``RLHF_DPO_SELECT=validation``).

Why: the quiz checks (:mod:`rlhf.quiz`) say which checkpoints still know what the parent knew,
not which of them answers better. Round 2 of every real two-round run so far lost its verdict by
one or two held-out prompts (0.46-0.50 against its parent, bench/results/rlhf_rounds_real.md),
while the checkpoints it passed over differed by as much. Keeping, among the checkpoints that
pass the quiz, the one that wins most often against the parent under the labellers' rule on
``validation`` questions of ``rlhf/prompts.yaml`` is early stopping on the measure the round is
judged by. The questions are disjoint from ``heldout`` (the verdict) and from ``train`` (what the
labellers asked), so the held-out figures stay on prompts no choice was made on. The answers are
the float32 policy's greedy ones (a proxy for the exported build's, as the quiz's are).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhf.evaluation import judge
from rlhf.preference import PROMPTS_FILE, score


def questions(path: Path = PROMPTS_FILE, key: str = "validation") -> list[str]:
    """The ``validation`` questions of ``rlhf/prompts.yaml`` (or another list of it: ``anchor``)."""
    return list(yaml.safe_load(path.read_text(encoding="utf-8")).get(key) or [])


@dataclass(frozen=True)
class ValidationCheck:
    """One checkpoint's rule record against the parent on the validation questions."""

    step: int
    wins: int
    ties: int
    losses: int

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "wins": self.wins, "ties": self.ties, "losses": self.losses}


def record(step: int, questions: Sequence[str], parent: Sequence[str], child: Sequence[str]) -> ValidationCheck:
    """The child's wins, ties and losses against the parent, question by question, by the rule
    (as the held-out evaluation counts them: :func:`rlhf.evaluation.judge`)."""
    judged = judge(questions, parent, child, score)
    return ValidationCheck(step, judged["child_wins"], judged["ties"], judged["child_losses"])


def preference(check: ValidationCheck) -> tuple[int, int, int]:
    """The order checkpoints are kept by: most wins, then fewest losses, then the latest."""
    return check.wins, -check.losses, check.step


def best_step(passed: Sequence[int], checks: Sequence[ValidationCheck]) -> int | None:
    """Among the ``passed`` steps (their quiz within the points), the most preferred
    (:func:`preference`). None when no step passed."""
    by_step = {c.step: c for c in checks}
    candidates = [by_step[s] for s in passed if s in by_step]
    if not candidates:
        return None
    return max(candidates, key=preference).step
