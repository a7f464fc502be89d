"""PPO pieces on numbers small enough to work out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import ppo


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_kl_penalty_is_per_token_and_the_score_lands_on_the_last_real_token() -> None:
    # kl = logp - ref = [-1 - -1.5, -2 - -1, masked] = [0.5, -1.0, 0]
    # rewards = -0.1 * kl = [-0.05, 0.1, 0]; last real token is index 1: 0.1 + 2.0 = 2.1
    rewards, kl = ppo.kl_penalized_rewards(torch.tensor([2.0], dtype=torch.float64),
                                           t([-1.0, -2.0, -5.0]), t([-1.5, -1.0, -7.0]),
                                           t([1, 1, 0]), kl_coef=0.1)
    assert kl.tolist()[0] == pytest.approx([0.5, -1.0, 0.0])
    assert rewards.tolist()[0] == pytest.approx([-0.05, 2.1, 0.0])


def test_gae_full_row() -> None:
    # gamma 0.9, lambda 0.8 (gamma * lambda = 0.72), V after the last token = 0
    # t=2: delta = 2 + 0 - 1.5 = 0.5                    A2 = 0.5
    # t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35           A1 = 0.35 + 0.72 * 0.5 = 0.71
    # t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4            A0 = 1.4 + 0.72 * 0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    adv, ret = ppo.gae(t([1.0, 0.0, 2.0]), t([0.5, 1.0, 1.5]), t([1, 1, 1]), gamma=0.9, lam=0.8)
    assert adv.tolist()[0] == pytest.approx([1.9112, 0.71, 0.5])
    assert ret.tolist()[0] == pytest.approx([2.4112, 1.71, 2.0])


def test_gae_stops_at_the_end_of_the_response() -> None:
    # mask [1, 1, 0]: token 1 is the last, so V_2 (9.0, padding) must not leak in
    # t=1: delta = 2 - 1.0 = 1.0                        A1 = 1.0
    # t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4            A0 = 1.4 + 0.72 * 1.0 = 2.12
    # returns = [2.62, 2.0, 0]
    adv, ret = ppo.gae(t([1.0, 2.0, 0.0]), t([0.5, 1.0, 9.0]), t([1, 1, 0]), gamma=0.9, lam=0.8)
    assert adv.tolist()[0] == pytest.approx([2.12, 1.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([2.62, 2.0, 0.0])


def test_clipped_surrogate_loss_clip_fraction_and_approx_kl() -> None:
    # ratios r = [1.5, 0.5, 1.1], advantages [1, 1, -2], eps 0.2
    # tok0: -A r = -1.5, -A clip(r) = -1.2 -> max -1.2 (clipped term wins)
    # tok1: -A r = -0.5, -A clip(r) = -0.8 -> max -0.5 (unclipped: pessimistic bound)
    # tok2: -A r =  2.2, -A clip(r) =  2.2 -> max  2.2 (inside the range)
    # loss = (-1.2 - 0.5 + 2.2) / 3 = 0.5 / 3; clip fraction = 1/3
    # approx KL = mean((r - 1) - ln r)
    #   = (0.5 - ln 1.5 + -0.5 - ln 0.5 + 0.1 - ln 1.1) / 3
    #   = (0.094535 + 0.193147 + 0.004690) / 3 = 0.097457
    old = t([-1.0, -1.0, -1.0])
    new = (old + torch.log(t([1.5, 0.5, 1.1]))).requires_grad_(True)
    out = ppo.policy_loss(new, old, t([1.0, 1.0, -2.0]), t([1, 1, 1]), clip_range=0.2)
    assert out.loss.item() == pytest.approx(0.5 / 3)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    assert out.approx_kl.item() == pytest.approx(0.097457, abs=1e-6)
    out.loss.backward()
    # d/dlogp of -A r / 3 is -A r / 3: tok0 is clipped (no gradient), tok1 -0.5/3, tok2 2.2/3
    assert new.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 3, 2.2 / 3])


def test_clipped_value_loss() -> None:
    # c = 0.5. tok0: V_clip = 1 + clip(2 - 1) = 1.5; (2-3)^2 = 1, (1.5-3)^2 = 2.25 -> 2.25 (clipped)
    #          tok1: V_clip = 1 + clip(0 - 1) = 0.5; (0-0.5)^2 = 0.25, (0.5-0.5)^2 = 0 -> 0.25
    # loss = 0.5 * (2.25 + 0.25) / 2 = 0.625; clip fraction 1/2
    loss, frac = ppo.value_loss(t([2.0, 0.0]), t([1.0, 1.0]), t([3.0, 0.5]), t([1, 1]), 0.5)
    assert loss.item() == pytest.approx(0.625)
    assert frac.item() == pytest.approx(0.5)


def test_entropy_and_logprobs() -> None:
    # logits [0, 0]: uniform over 2 -> H = ln 2
    # logits [0, ln 3]: p = [0.25, 0.75] -> H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]], dtype=torch.float64)
    assert ppo.entropy_from_logits(logits).tolist()[0] == pytest.approx([math.log(2), 0.562335], abs=1e-6)
    # log p(token 1) at position 1 = ln 0.75
    lp = ppo.logprobs_from_logits(logits, torch.tensor([[0, 1]]))
    assert lp.tolist()[0] == pytest.approx([math.log(0.5), math.log(0.75)])


def test_whiten_and_masked_mean_ignore_padding() -> None:
    # masked values [1, 2, 3]: mean 2, variance (1 + 0 + 1) / 3 = 2/3, std 0.816497
    # whitened = [-1/0.816497, 0, 1/0.816497] = [-1.224745, 0, 1.224745]; padding stays 0
    values, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    assert ppo.masked_mean(values, mask).item() == pytest.approx(2.0)
    assert ppo.masked_whiten(values, mask).tolist()[0] == pytest.approx([-1.224745, 0.0, 1.224745, 0.0],
                                                                     abs=1e-6)


def test_last_index() -> None:
    assert ppo.last_index(torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])).tolist() == [1, 2, 0]
