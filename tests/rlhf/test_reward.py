"""The reward model's pairwise loss on hand numbers, and its head on the last real token."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.reward import RewardModel, last_token_index, pairwise_loss, position_ids, ranking_pairs


def test_a_ranking_of_k_gives_all_k_choose_2_pairs_best_first() -> None:
    assert ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert len(ranking_pairs([3, 1, 0, 2])) == 6
    assert ranking_pairs([1]) == []


def test_a_rankings_ties_give_no_pair_between_the_tied_answers() -> None:
    # 3 ~ 1 > 0 ~ 2: only the pairs across the two runs of ties
    assert ranking_pairs([3, 1, 0, 2], [True, False, True]) == [(3, 0), (3, 2), (1, 0), (1, 2)]
    assert ranking_pairs([2, 0, 1], [False, False]) == ranking_pairs([2, 0, 1])
    assert ranking_pairs([2, 0, 1], [True, True]) == []


def test_pairwise_loss_on_hand_numbers() -> None:
    # Element A: rewards r0=2, r1=1, r2=0, ranking [0, 1, 2] -> pairs (0,1), (0,2), (1,2)
    #   differences 1, 2, 1; -log sigmoid(d) = log(1 + e^-d)
    #   = 0.313262, 0.126928, 0.313262 -> mean 0.251151
    # Element B: rewards r3=0, r4=1, label "3 better than 4" -> d = -1 -> log(1 + e) = 1.313262
    # loss = (0.251151 + 1.313262) / 2 = 0.782206 (each prompt counts once, whatever its K)
    # accuracy: A orders 3/3 pairs right, B 0/1 -> 3/4
    rewards = torch.tensor([2.0, 1.0, 0.0, 0.0, 1.0])
    result = pairwise_loss(rewards, [ranking_pairs([0, 1, 2]), [(3, 4)]])
    a = (math.log1p(math.exp(-1)) * 2 + math.log1p(math.exp(-2))) / 3
    b = math.log1p(math.e)
    assert a == pytest.approx(0.251151, abs=1e-6) and b == pytest.approx(1.313262, abs=1e-6)
    assert result.loss.item() == pytest.approx((a + b) / 2)
    assert result.loss.item() == pytest.approx(0.782206, abs=1e-6)
    assert (result.correct, result.pairs, result.accuracy) == (3, 4, 0.75)


def test_pairwise_loss_gradient_pushes_the_better_answer_up() -> None:
    # d/dr_b of -log sigmoid(r_b - r_w) = -(1 - sigmoid(0)) = -0.5 at equal rewards
    rewards = torch.zeros(2, requires_grad=True)
    pairwise_loss(rewards, [[(0, 1)]]).loss.backward()
    assert rewards.grad.tolist() == pytest.approx([-0.5, 0.5])


def test_positions_and_last_token_work_for_left_and_right_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 0, 1, 2, 2]]
    assert last_token_index(mask).tolist() == [4, 2, 3]


def test_reward_model_reads_the_last_real_token_only() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0)
    rm = RewardModel.from_causal_lm(LlamaForCausalLM(config)).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    with torch.no_grad():
        padded = rm(ids, mask)
        # Whatever sits in the padding does not change the score ...
        other_padding = rm(torch.tensor([[5, 6, 7, 9, 9]]), mask)
        # ... and the score is the head applied to the hidden state of token 7 (position 2).
        unpadded = rm(ids[:, :3], mask[:, :3])
    assert padded.shape == (1,)
    assert padded.item() == pytest.approx(other_padding.item(), abs=1e-5)
    assert padded.item() == pytest.approx(unpadded.item(), abs=1e-5)
