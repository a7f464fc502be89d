"""DPO's loss on numbers worked out by hand (rlhf.dpo)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.dpo import answer_logprobs, best_answers, dpo_loss


def test_loss_of_one_pair_by_hand() -> None:
    # policy log p: better -1.0, worse -2.0; frozen reference: both -1.5; beta 0.1
    # implicit rewards 0.1 * (-1.0 + 1.5) = 0.05 and 0.1 * (-2.0 + 1.5) = -0.05, margin 0.1
    # loss = -log sigmoid(0.1) = log(1 + e^-0.1) = 0.644397
    result = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.5]), [[(0, 1)]], beta=0.1)
    assert result.loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-6)
    assert result.loss.item() == pytest.approx(0.644397, abs=1e-6)
    assert (result.correct, result.pairs) == (1, 1)
    assert result.margin == pytest.approx(0.1)
    assert result.chosen_reward == pytest.approx(0.05) and result.rejected_reward == pytest.approx(-0.05)


def test_simpo_loss_of_one_pair_by_hand() -> None:
    # policy log p: better -6.0 over 3 tokens, worse -12.0 over 4 tokens; beta 2, gamma 1; no reference
    # rewards 2 * (-6 / 3) = -4 and 2 * (-12 / 4) = -6; loss = -log sigmoid(-4 + 6 - 1) = log(1 + e^-1) = 0.313262
    result = dpo_loss(torch.tensor([-6.0, -12.0]), None, [[(0, 1)]], beta=2.0, tokens=torch.tensor([3, 4]),
                      simpo_margin=1.0)
    assert result.loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert (result.correct, result.pairs) == (1, 1)
    assert result.chosen_reward == pytest.approx(-4.0) and result.rejected_reward == pytest.approx(-6.0)
    assert result.margin == pytest.approx(2.0)  # the rewards' gap; gamma is what the loss asks of it


def test_simpo_rewards_likelihood_per_token_so_a_longer_answer_gains_nothing_from_length() -> None:
    # the same mean log-probability per token (-1.5), 2 tokens against 8: equal rewards, a log 2 + margin loss
    result = dpo_loss(torch.tensor([-3.0, -12.0]), None, [[(0, 1)]], beta=2.0, tokens=torch.tensor([2, 8]),
                      simpo_margin=0.0)
    assert result.loss.item() == pytest.approx(math.log(2)) and result.correct == 0
    # DPO's summed log-ratio would have ordered them (the reference is not looked at)
    assert dpo_loss(torch.tensor([-3.0, -12.0]), torch.tensor([-3.0, -3.0]), [[(0, 1)]], beta=2.0).correct == 1
    with pytest.raises(ValueError, match="token count"):
        dpo_loss(torch.tensor([-3.0, -12.0]), None, [[(0, 1)]], beta=2.0, simpo_margin=1.0)
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(torch.tensor([-3.0, -12.0]), None, [[(0, 1)]], beta=2.0)


def test_policy_equal_to_reference_costs_log_2_whatever_beta() -> None:
    logps = torch.tensor([-3.0, -1.0, -7.0])
    for beta in (0.01, 0.1, 5.0):
        result = dpo_loss(logps, logps.clone(), [[(0, 1), (0, 2)]], beta)
        assert result.loss.item() == pytest.approx(math.log(2))
        assert result.correct == 0  # a tie is not a correct order


def test_each_element_weighs_the_same_and_the_gradient_favours_the_better_answer() -> None:
    # element 1: one pair; element 2: two pairs (a tie and a wrongly ordered pair)
    policy = torch.tensor([-1.0, -2.0, -1.0, -1.0, -2.0], requires_grad=True)
    reference = torch.tensor([-1.5, -1.5, -1.0, -1.0, -1.0])
    result = dpo_loss(policy, reference, [[(0, 1)], [(2, 3), (4, 2)]], beta=0.5)
    # element 1 at beta 0.5: margin 0.5 * (0.5 + 0.5) = 0.5; element 2: margins 0 and 0.5 * (-1 - 0) = -0.5
    e1 = math.log1p(math.exp(-0.5))
    e2 = (math.log(2) + math.log1p(math.exp(0.5))) / 2
    assert result.loss.item() == pytest.approx((e1 + e2) / 2, abs=1e-6)
    assert (result.correct, result.pairs) == (1, 3)
    result.loss.backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descending the loss raises the better answer's log p


def test_answer_logprobs_sum_only_the_answer_tokens() -> None:
    # vocabulary of 2, uniform logits: every predicted token has log p = log 1/2
    ids = torch.tensor([[0, 1, 1, 0, 0]])
    logits = torch.zeros(1, 5, 2)
    answer = torch.tensor([[0, 0, 1, 1, 0]])  # tokens 2 and 3 are the answer, token 4 padding
    assert answer_logprobs(logits, ids, answer).item() == pytest.approx(2 * math.log(0.5))
    # a confident model: logits at position 1 put all mass on token 1 (= ids[0, 2])
    logits[0, 1] = torch.tensor([-1e4, 0.0])
    assert answer_logprobs(logits, ids, answer).item() == pytest.approx(math.log(0.5), abs=1e-4)


def test_no_pairs_gives_a_zero_loss_that_still_backpropagates() -> None:
    policy = torch.tensor([-1.0], requires_grad=True)
    result = dpo_loss(policy, torch.tensor([-1.0]), [[]], beta=0.1)
    assert result.loss.item() == 0.0 and result.pairs == 0
    result.loss.backward()


def test_best_answers_are_better_in_a_pair_and_worse_in_none() -> None:
    # a ranking 2 > 0 > 1 (all its pairs), a rating pair 3 > 4, and an element without pairs
    assert best_answers([[(2, 0), (2, 1), (0, 1)], [(3, 4)], []]) == [2, 3]


def test_the_nll_term_adds_the_best_answers_per_token_nll_by_hand() -> None:
    # the one-pair case above (DPO loss 0.644397) plus weight 0.5 x NLL of answer 0 (log p -1.0
    # over 4 tokens: 0.25 per token) = 0.644397 + 0.125
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    result = dpo_loss(policy, torch.tensor([-1.5, -1.5]), [[(0, 1)]], beta=0.1, nll_weight=0.5,
                      tokens=torch.tensor([4, 8]))
    assert result.nll == pytest.approx(0.25)
    assert result.loss.item() == pytest.approx(0.644397 + 0.125, abs=1e-6)
    assert result.margin == pytest.approx(0.1)  # what is watched stays DPO's
    result.loss.backward()
    # d/d policy[0]: DPO's -beta * sigmoid(-0.1) plus the NLL's -0.5 / 4
    assert policy.grad[0].item() == pytest.approx(-0.1 / (1 + math.exp(0.1)) - 0.125, abs=1e-6)
    with pytest.raises(ValueError, match="token count"):
        dpo_loss(policy, torch.tensor([-1.5, -1.5]), [[(0, 1)]], beta=0.1, nll_weight=0.5)


def test_without_the_pairwise_term_only_the_best_answers_nll_is_trained() -> None:
    # rejection-sampling fine-tuning: the same case with pairwise_weight 0 is 0.5 x 0.25, and the
    # worse answer gets no gradient at all (nothing is pushed down); the watched margin is DPO's
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    result = dpo_loss(policy, torch.tensor([-1.5, -1.5]), [[(0, 1)]], beta=0.1, nll_weight=0.5,
                      tokens=torch.tensor([4, 8]), pairwise_weight=0.0)
    assert result.loss.item() == pytest.approx(0.125)
    assert result.margin == pytest.approx(0.1) and (result.correct, result.pairs) == (1, 1)
    result.loss.backward()
    assert policy.grad.tolist() == pytest.approx([-0.125, 0.0])
    with pytest.raises(ValueError, match="nll_weight must be > 0"):
        dpo_loss(policy, torch.tensor([-1.5, -1.5]), [[(0, 1)]], beta=0.1, pairwise_weight=0.0)


def test_a_trainer_without_any_loss_is_refused_when_the_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf.config import load_config
    from services.common.config import ConfigError

    monkeypatch.setenv("RLHF_DPO_PAIRWISE", "0")
    with pytest.raises(ConfigError, match="RLHF_DPO_PAIRWISE=0 needs RLHF_DPO_NLL > 0"):
        load_config()
    monkeypatch.setenv("RLHF_DPO_NLL", "1.0")
    assert (load_config().dpo_pairwise, load_config().dpo_nll) == (0.0, 1.0)


def test_the_manifest_names_the_trainer_that_ran() -> None:
    from rlhf.config import load_config
    from rlhf.job import dpo_method

    assert dpo_method(load_config(dpo_beta=0.1)) == "DPO against the parent, beta 0.1 (rlhf.job)"
    assert dpo_method(load_config(dpo_nll=1.0)).endswith("+ the best answers' NLL x 1.0 (rlhf.job)")
    rs = dpo_method(load_config(dpo_nll=1.0, dpo_pairwise=0.0))
    assert rs.startswith("rejection-sampling fine-tuning") and "no pairwise term" in rs
    anchored = dpo_method(load_config(dpo_nll=1.0, dpo_anchor=0.5))
    assert anchored.endswith("NLL x 1.0 + KL to the parent on the anchor questions x 0.5 (rlhf.job)")
    simpo = dpo_method(load_config(dpo_loss="simpo", dpo_beta=2.5, simpo_gamma=1.25, dpo_nll=1.0))
    assert simpo == ("SimPO (mean log-probability per token, no reference), beta 2.5, gamma 1.25"
                     " + the best answers' NLL x 1.0 (rlhf.job)")


def test_an_unknown_pairwise_loss_is_refused_when_the_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf.config import load_config
    from services.common.config import ConfigError

    monkeypatch.setenv("RLHF_DPO_LOSS", "ipo")
    with pytest.raises(ConfigError, match="RLHF_DPO_LOSS"):
        load_config()


def test_anchor_kl_is_zero_at_the_parent_and_counts_only_answer_positions() -> None:
    from rlhf.dpo import anchor_kl

    torch.manual_seed(0)
    ref = torch.randn(2, 5, 7)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])  # position t predicts token t + 1
    assert anchor_kl(ref.clone(), ref, mask).item() == pytest.approx(0.0, abs=1e-6)
    moved = ref.clone()
    moved[0, 0] += torch.randn(7) * 3  # predicts a prompt token: not counted
    moved[1, 3] += torch.randn(7) * 3  # predicts padding: not counted
    assert anchor_kl(moved, ref, mask).item() == pytest.approx(0.0, abs=1e-6)
    moved[0, 2] += torch.arange(7.0)  # predicts an answer token
    p, q = torch.softmax(ref[0, 2], -1), torch.softmax(moved[0, 2], -1)
    by_hand = float((p * (p.log() - q.log())).sum()) / 5  # 5 answer positions in all (3 + 2)
    assert anchor_kl(moved, ref, mask).item() == pytest.approx(by_hand, rel=1e-5)
    assert by_hand > 0


def test_anchor_questions_are_disjoint_from_every_other_set() -> None:
    import yaml

    from model.quality import QUESTIONS
    from rlhf.preference import PROMPTS_FILE

    sets = yaml.safe_load(PROMPTS_FILE.read_text(encoding="utf-8"))
    anchor = set(sets["anchor"])
    assert len(anchor) == len(sets["anchor"]) > 100
    for name in ("train", "heldout", "validation"):
        assert anchor.isdisjoint(sets[name]), name
    quiz = {m["content"] for q in QUESTIONS for m in q.messages() if m["role"] == "user"}
    assert anchor.isdisjoint(quiz)


def test_an_answer_cut_short_gets_no_end_token_and_an_ended_one_does() -> None:
    from model.tiny import cached_tiny_model
    from rlhf.train import Encoder, answer_batch

    enc = Encoder(cached_tiny_model() / "tokenizer.json", max_prompt_tokens=32, max_answer_tokens=16)
    item = {"prompt": "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
            "answers": ["Because the sky", "Because."], "pairs": [(1, 0)], "ended": [False, True]}
    ids, _, answer, _ = answer_batch([item], enc)
    cut, ended = (ids[i][answer[i].bool()].tolist() for i in range(2))
    assert cut == enc.tokenizer.encode("Because the sky", add_special_tokens=False).ids
    assert ended == [*enc.tokenizer.encode("Because.", add_special_tokens=False).ids, enc.eos]
    # Rows from before finish reasons were kept: every answer ends, as before.
    _, _, answer_old, _ = answer_batch([{**item, "ended": []}], enc)
    assert answer_old[0].sum().item() == len(cut) + 1


def test_the_checkpoints_mean_is_the_elementwise_mean_whatever_their_order() -> None:
    from rlhf.train import CheckpointMean

    states = [{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.1])},
              {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor([0.2])},
              {"w": torch.tensor([1e-8, 5.0]), "b": torch.tensor([0.3])}]
    forward, backward = CheckpointMean(), CheckpointMean()
    for i, state in enumerate(states):
        forward.add(12 * (i + 1), state)
    for i, state in reversed(list(enumerate(states))):
        backward.add(12 * (i + 1), state)
    mean = forward.mean()
    assert forward.steps == [12, 24, 36]
    assert torch.allclose(mean["w"], torch.tensor([(4.0 + 1e-8) / 3, 5.0 / 3]))
    assert torch.allclose(mean["b"], torch.tensor([0.2]))
    assert all(torch.equal(mean[k], backward.mean()[k]) for k in mean)
    assert mean["w"].dtype == torch.float32


def test_a_simpo_batch_scores_the_policy_per_token_and_never_runs_the_reference() -> None:
    """rlhf.train's batch with RLHF_DPO_LOSS=simpo: the loss is SimPO's on the policy's own log-probabilities
    (worked out again from them here), and the parent is not needed (None stands in for it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.tiny import cached_tiny_model
    from rlhf.dpo import answer_logprobs
    from rlhf.train import Encoder, _dpo_batch, _lm_logits, answer_batch

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    enc = Encoder(cached_tiny_model() / "tokenizer.json", max_prompt_tokens=32, max_answer_tokens=16)
    item = {"prompt": "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
            "answers": ["Light scatters.", "Because it is blue, blue, blue."], "pairs": [(0, 1)], "ended": [True, True]}
    hp = {"dpo_beta": 2.0, "dpo_nll": 0.0, "dpo_pairwise": 1.0, "dpo_loss": "simpo", "simpo_gamma": 0.5}
    result = _dpo_batch(lm, None, [item], enc, hp, torch.device("cpu"))
    ids, mask, answer, _ = answer_batch([item], enc)
    with torch.no_grad():
        logps = answer_logprobs(_lm_logits(lm, ids, mask), ids, answer)
    per_token = logps / answer[:, 1:].sum(-1)
    want = -torch.nn.functional.logsigmoid(2.0 * (per_token[0] - per_token[1]) - 0.5)
    assert result.loss.item() == pytest.approx(want.item(), rel=1e-5)
    result.loss.backward()  # it trains the policy
    assert lm.model.layers[0].mlp.up_proj.weight.grad is not None
