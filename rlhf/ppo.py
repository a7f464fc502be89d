"""PPO for language models as plain torch functions (no TRL: it no longer ships PPO).

Shapes: ``[B, T]`` over the *response* tokens of a rollout batch, with ``mask`` 1 on real
response tokens (a contiguous run from position 0, up to and including ``<|im_end|>``) and
0 on padding. Everything is a pure function of tensors so each piece is tested on numbers
worked out by hand (tests/rlhf/test_ppo.py).

The recipe is the one of Ziegler et al. (2019) / InstructGPT as TRL used to implement it:

* reward per token = ``-kl_coef * (logp - ref_logp)``; the reward model's scalar score is
  added at the last response token;
* advantages by GAE(gamma, lambda) over the response tokens, returns = advantages + values;
* clipped surrogate policy loss, clipped value loss, entropy for monitoring (and an optional
  bonus), the fraction of clipped ratios and an approximate KL(old || new) for early stopping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is 1 (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance over the masked positions (advantages are whitened so the
    policy step size does not depend on the reward scale)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under ``logits`` ([B, T, V] and [B, T] -> [B, T])."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position ([B, T, V] -> [B, T])."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of ``mask`` (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef * kl`` plus the score at the last token; returns (rewards, kl).

    ``kl = logp - ref_logp`` is the per-token sample estimate of KL(policy || reference):
    its sum over a response is log pi(y|x) - log pi_ref(y|x), the InstructGPT penalty.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; returns (advantages, returns).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` = 0 after the last real token, and
    ``A_t = delta_t + gamma * lam * A_{t+1}``; returns are ``A + V`` (the value targets).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(steps)):
        next_mask = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        running = delta + gamma * lam * running * next_mask
        advantages[:, t] = running
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages.detach(), returns.detach()


@dataclass(frozen=True)
class PolicyLoss:
    """The clipped surrogate loss and what to watch while minimising it."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> PolicyLoss:
    """PPO-clip: ``mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))`` with ``r = pi / pi_old``.

    ``clip_fraction`` is the share of tokens whose clipped term won; ``approx_kl`` is
    ``mean((r - 1) - log r)``, an unbiased, non-negative estimate of KL(old || new) used to
    stop a rollout's epochs early when the policy has moved too far.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return PolicyLoss(loss, clip_fraction.detach(), approx_kl.detach())


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * mean(max((V - R)^2, (V_clip - R)^2))``; returns (loss, clip fraction).

    ``V_clip = V_old + clip(V - V_old, -c, c)`` keeps the value head from jumping on one batch.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).float(), mask).detach()
