"""Direct Preference Optimization (Rafailov et al., 2023) as plain torch functions.

The recipe SmolLM2-Instruct was tuned with: no reward model and no sampling; the policy is
trained straight on the comparisons, each ``(better, worse)`` pair pushing up
``beta * [(log pi(better) - log ref(better)) - (log pi(worse) - log ref(worse))]`` through
``-log sigmoid``, with ``ref`` the frozen parent. Written here rather than taken from TRL: the
project does not depend on TRL (PPO is hand-written for the same reason, ``rlhf.ppo``), and the
loss is four lines that the tests check on numbers worked out by hand (tests/rlhf/test_dpo.py).

Shapes: ``[B]`` per answer (summed log-probabilities of its tokens given the prompt).

Optionally (``nll_weight`` > 0) the loss adds the negative log-likelihood per token of each
element's best answer, as in RPO (Pang et al., 2024, "Iterative Reasoning Preference
Optimization"; TRL's ``rpo_alpha``): DPO alone only widens the gap between the two answers, and
can lower both (the real runs' chosen log-ratio stayed near 0 while the rejected one fell), which
drifts the policy off answers it used to give; the NLL term holds the better answers' likelihood up.
``pairwise_weight`` scales DPO's own term: at 0 only that NLL is left, i.e. rejection-sampling
fine-tuning on each ranking's best answer (Touvron et al., 2023, Llama 2's RLHF rounds), which
moves the policy towards its best samples without pushing any answer down.

``simpo_margin`` (not None) swaps DPO's implicit reward for SimPO's (Meng et al., 2024, "SimPO:
Simple Preference Optimization with a Reference-Free Reward"): ``beta`` times the answer's *mean*
log-probability per token under the policy, no reference, and the better answer must lead by the
margin (gamma). Why it is here: the judged answers are greedy, and greedy decoding follows
per-token likelihood, which DPO's summed log-ratio against the parent does not target (a DPO round
can raise the better samples' ratio while the greedy path stays where it was); SimPO's reward is
that likelihood itself, normalized by length so longer answers gain nothing from it. SimPO's scale
differs from DPO's: its paper uses beta 2-2.5 and gamma about half of beta.
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
    nll: float = 0.0  # the best answers' mean negative log-likelihood per token (with nll_weight)


def best_answers(groups: Sequence[Sequence[tuple[int, int]]]) -> list[int]:
    """Each element's best answer: better in one of its pairs and worse in none (a ranking's
    first, a rating pair's thumbs-up); an element without one (no pairs) has none."""
    best = []
    for pairs in groups:
        worse = {w for _, w in pairs}
        best += sorted({b for b, _ in pairs} - worse)[:1]
    return best


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor | None, groups: Sequence[Sequence[tuple[int, int]]],
             beta: float, nll_weight: float = 0.0, tokens: torch.Tensor | None = None,
             pairwise_weight: float = 1.0, simpo_margin: float | None = None) -> DPOLoss:
    """DPO's loss over a batch's answers.

    ``policy`` and ``reference`` hold ``log p(answer | prompt)`` of each answer of the batch
    under the policy and the frozen reference; ``groups[e]`` lists element ``e``'s
    ``(better, worse)`` pairs as indexes into them. Like the reward model's
    (:func:`rlhf.reward.pairwise_loss`), each element weighs the same whatever its number of pairs.
    With ``nll_weight`` > 0, ``tokens`` (each answer's token count) turns the best answers'
    ``-log p`` into a per-token NLL, added with that weight; ``pairwise_weight`` scales DPO's
    term (the accuracy and margins are reported whatever it is). With ``simpo_margin`` the reward
    is SimPO's (``reference`` is not used and may be None; ``tokens`` is needed).
    """
    if simpo_margin is None:
        if reference is None:
            raise ValueError("DPO's implicit reward needs the reference's log-probabilities")
        rewards = beta * (policy - reference)  # the implicit reward of each answer
    else:
        if tokens is None:
            raise ValueError("SimPO's reward needs each answer's token count")
        rewards = beta * policy / tokens.clamp(min=1).to(policy.dtype)
    # DPO is the reward model's loss on implicit rewards (SimPO: with its margin)
    result = pairwise_loss(rewards, groups, margin=simpo_margin or 0.0)
    if not result.pairs:
        return DPOLoss(policy.sum() * 0.0, 0, 0, 0.0, 0.0, 0.0)
    if pairwise_weight <= 0 and nll_weight <= 0:
        raise ValueError("with no pairwise term the NLL term is all the loss: nll_weight must be > 0")
    loss, nll = pairwise_weight * result.loss, 0.0
    if nll_weight > 0:
        if tokens is None:
            raise ValueError("nll_weight needs each answer's token count")
        best = best_answers(groups)
        per_token = -(policy[best] / tokens[best].clamp(min=1).to(policy.dtype)).mean()
        loss, nll = loss + nll_weight * per_token, float(per_token.detach())
    better = rewards[[b for pairs in groups for b, _ in pairs]].detach()
    worse = rewards[[w for pairs in groups for _, w in pairs]].detach()
    return DPOLoss(loss, result.correct, result.pairs, float((better - worse).mean()),
                   float(better.mean()), float(worse.mean()), nll)


def anchor_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of KL(reference || policy) between next-token distributions.

    Logits ``[B, T, V]`` of the same rows (a prompt and the parent's greedy answer to it);
    ``answer_mask[B, T]`` is 1 on answer tokens, so a position counts where it predicts one. Why
    the full distributions and not the NLL of the parent's answer: the KL is 0 where the policy
    still is the parent, so the term only pulls back drift and does not sharpen the parent's own
    choices, which an NLL on its greedy answers would.
    """
    target = answer_mask[:, 1:].to(policy_logits.dtype)
    ref = torch.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    pol = torch.log_softmax(policy_logits[:, :-1].float(), dim=-1)
    per_position = (ref.exp() * (ref - pol)).sum(-1)
    return (per_position * target).sum() / target.sum().clamp(min=1.0)
