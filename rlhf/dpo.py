"""Direct Preference Optimization (Rafailov et al., 2023) as plain torch functions.

The recipe SmolLM2-Instruct was tuned with: no reward model and no sampling; the policy is
trained straight on the comparisons, each ``(better, worse)`` pair pushing up
``beta * [(log pi(better) - log ref(better)) - (log pi(worse) - log ref(worse))]`` through
``-log sigmoid``, with ``ref`` the frozen parent. Written here rather than taken from TRL: the
project does not depend on TRL (PPO is hand-written for the same reason, ``rlhf.ppo``), and the
loss is four lines that the tests check on numbers worked out by hand (tests/rlhf/test_dpo.py).

Shapes: ``[B]`` per answer (summed log-probabilities of its tokens given the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhf.ppo import logprobs_from_logits
from rlhf.reward import pairwise_loss


def answer_logprobs(logits: torch.Tensor, ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """``log p(answer | prompt)`` per row: the sum of the answer tokens' log-probabilities.

    ``logits`` [B, T, V] of a forward over ``ids`` [B, T]; ``answer_mask`` [B, T] is 1 on the
    answer's tokens. Position ``t``'s logits predict token ``t + 1``.
    """
    logprobs = logprobs_from_logits(logits[:, :-1], ids[:, 1:])
    return (logprobs * answer_mask[:, 1:].to(logprobs.dtype)).sum(-1)


@dataclass(frozen=True)
class DPOLoss:
    """The loss (mean over elements of the mean over their pairs) and what to watch."""

    loss: torch.Tensor
    correct: int  # pairs whose implicit reward orders them as the label does
    pairs: int
    margin: float  # mean over pairs of beta * (chosen log-ratio - rejected log-ratio)
    chosen_reward: float  # mean beta * (log pi - log ref) of the better answers
    rejected_reward: float


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, groups: Sequence[Sequence[tuple[int, int]]],
             beta: float) -> DPOLoss:
    """DPO's loss over a batch's answers.

    ``policy`` and ``reference`` hold ``log p(answer | prompt)`` of each answer of the batch
    under the policy and the frozen reference; ``groups[e]`` lists element ``e``'s
    ``(better, worse)`` pairs as indexes into them. Like the reward model's
    (:func:`rlhf.reward.pairwise_loss`), each element weighs the same whatever its number of pairs.
    """
    rewards = beta * (policy - reference)  # the implicit reward of each answer
    result = pairwise_loss(rewards, groups)  # DPO is the reward model's loss on implicit rewards
    if not result.pairs:
        return DPOLoss(policy.sum() * 0.0, 0, 0, 0.0, 0.0, 0.0)
    better = rewards[[b for pairs in groups for b, _ in pairs]].detach()
    worse = rewards[[w for pairs in groups for _, w in pairs]].detach()
    return DPOLoss(result.loss, result.correct, result.pairs, float((better - worse).mean()),
                   float(better.mean()), float(worse.mean()))
