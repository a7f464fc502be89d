"""The reward model: the policy's transformer with a scalar head, trained on comparisons.

As in InstructGPT, the reward model starts from the policy itself (the registry version's
float32 weights), drops the LM head and reads one scalar off the last real token's hidden
state. Each batch element is one labelled prompt with its K answers and every pair the label
orders (all C(K, 2) pairs of a strict ranking, fewer where it has ties), so one prompt's pairs
share a forward pass and do not overfit as K(K-1)/2 separate examples would; the element's loss
is the mean over its pairs of ``-log sigmoid(r_better - r_worse)``.

Ratings (thumbs up/down on one answer) order nothing by themselves: a rating is used only
where the same prompt has an up-rated and a down-rated answer, which gives the pair
(up better than down); lone ratings are counted and dropped (see :func:`rlhf.data.comparisons`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def ranking_pairs(ranking: Sequence[int], tied_with_next: Sequence[bool] = ()) -> list[tuple[int, int]]:
    """The ``(better, worse)`` candidate pairs of a best-first ranking: all C(K, 2) of a strict
    one; with ties (``tied_with_next[i]``: ``ranking[i]`` is as good as ``ranking[i + 1]``) none
    between two answers of one run of ties, which would train a preference the labeller did not state."""
    group, groups = 0, []
    for i in range(len(ranking)):
        if i and not (i - 1 < len(tied_with_next) and tied_with_next[i - 1]):
            group += 1
        groups.append(group)
    return [(ranking[i], ranking[j]) for i, j in combinations(range(len(ranking)), 2) if groups[i] != groups[j]]


@dataclass(frozen=True)
class PairwiseResult:
    """Loss (mean over elements of the mean over their pairs), pair accuracy and pair count."""

    loss: torch.Tensor
    correct: int
    pairs: int

    @property
    def accuracy(self) -> float:
        """Share of pairs the model orders as the label does (ties count as wrong)."""
        return self.correct / self.pairs if self.pairs else 0.0


def pairwise_loss(rewards: torch.Tensor, groups: Sequence[Sequence[tuple[int, int]]],
                  margin: float = 0.0) -> PairwiseResult:
    """InstructGPT's comparison loss over ``rewards`` (flat, one per answer in the batch).

    ``groups[e]`` lists element ``e``'s ``(better, worse)`` pairs as indexes into ``rewards``.
    Each element is weighted equally whatever its K (the 1 / C(K, 2) normalisation). ``margin``:
    the better answer is pushed until it leads by that much (SimPO's gamma; 0 for the reward model).
    """
    losses = []
    correct = total = 0
    for pairs in groups:
        if not pairs:
            continue
        better = rewards[[b for b, _ in pairs]]
        worse = rewards[[w for _, w in pairs]]
        losses.append(-F.logsigmoid(better - worse - margin).mean())
        correct += int((better > worse).sum().item())
        total += len(pairs)
    loss = torch.stack(losses).mean() if losses else rewards.sum() * 0.0
    return PairwiseResult(loss, correct, total)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift RoPE."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).max(dim=1).values


class RewardModel(nn.Module):
    """A causal LM's body plus a linear head on the last non-pad token's hidden state."""

    def __init__(self, body: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, lm: Any) -> RewardModel:
        """Take ``lm.model`` (the transformer without the LM head) as the body."""
        return cls(lm.model, lm.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar reward per row."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, last_token_index(attention_mask)]).squeeze(-1).float()
