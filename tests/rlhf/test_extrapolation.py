"""RLHF_DPO_EXTRAPOLATE (ExPO): the factors it reads, the weights it makes, and the choice among them."""

from __future__ import annotations

import pytest
import torch

from rlhf import quiz, validation
from rlhf.config import ConfigError, RLHFConfig, extrapolation_factors, load_config
from rlhf.train import extrapolated
from services.common.config import load


def test_the_factors_are_numbers_above_one_in_their_order() -> None:
    assert extrapolation_factors("1.5, 2,3") == [1.5, 2.0, 3.0]
    assert extrapolation_factors("") == []
    for bad in ("1", "0.5", "2,x", "nan", "-2"):
        with pytest.raises(ValueError):
            extrapolation_factors(bad)
    # as the job reads it: from the environment, each variable checked, a bad one named
    environ = {"RLHF_DPO_SELECT": "validation", "RLHF_DPO_QUIZ_EVERY": "6"}
    with pytest.raises(ConfigError, match="RLHF_DPO_EXTRAPOLATE='1,2' is out of range: comma-separated factors > 1"):
        load(RLHFConfig, environ={**environ, "RLHF_DPO_EXTRAPOLATE": "1,2"})
    assert load(RLHFConfig, environ={**environ, "RLHF_DPO_EXTRAPOLATE": "2,3"}).dpo_extrapolate == "2,3"


def test_extrapolation_needs_the_checkpoints_chosen_on_validation_with_the_quiz() -> None:
    with pytest.raises(ConfigError, match="RLHF_DPO_SELECT=validation"):
        load_config(dpo_extrapolate="2", dpo_select="quiz", dpo_quiz_every=6)
    with pytest.raises(ConfigError, match="RLHF_DPO_QUIZ_EVERY"):
        load_config(dpo_extrapolate="2", dpo_select="validation", dpo_quiz_every=0)
    assert load_config(dpo_extrapolate="2,3", dpo_select="validation", dpo_quiz_every=6).dpo_extrapolate == "2,3"


def test_extrapolated_weights_go_past_the_kept_ones_along_the_step_from_the_parent() -> None:
    parent = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    kept = {"w": torch.tensor([1.5, 1.0])}  # only the trained tensors
    out = extrapolated(parent, kept, 2.5)
    assert set(out) == {"w"}
    assert torch.allclose(out["w"], torch.tensor([2.25, -0.5]))  # 1 + 2.5 x 0.5, 2 + 2.5 x -1
    assert torch.equal(extrapolated(parent, kept, 1.0)["w"], kept["w"])


@pytest.mark.parametrize("parent_pct", [0.0, 90.0])
def test_the_check_keeps_the_best_factor_on_validation_within_the_quiz_points(parent_pct: float) -> None:
    """A real (small, random) Llama through the trainer's check: every factor is quizzed and scored, the
    kept one is the one with most wins (then fewest losses, then the smallest factor) among those that
    passed, and the model ends with exactly that factor's weights. With the parent's quiz at 90 % no
    extrapolation passes, and the weights are the kept ones again."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.tiny import cached_tiny_model
    from rlhf.evaluation import served_prompts
    from rlhf.train import Encoder, _extrapolation_check, _trainable_state, train_only_top_layers

    enc = Encoder(cached_tiny_model() / "tokenizer.json", max_prompt_tokens=64, max_answer_tokens=16)
    config = LlamaConfig(vocab_size=enc.tokenizer.get_vocab_size(), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         initializer_range=1.0)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    lm = LlamaForCausalLM(config).eval()
    lm.load_state_dict(reference.state_dict())
    train_only_top_layers(lm.model, 1)
    with torch.no_grad():  # "training" moved the top layer
        for p in lm.model.layers[1].parameters():
            p.add_(0.3 * torch.randn_like(p))
    kept = _trainable_state(lm)
    questions = validation.questions()[:6]
    asked = {"questions": questions, "prompts": served_prompts(questions)[0]}
    hp = {"dpo_extrapolate": "2,3", "eval_max_new_tokens": 6, "dpo_quiz_points": 1.5}
    parent = quiz.QuizCheck(0, 0, 184, parent_pct, True)
    parent_answers = ["I do not know."] * len(questions)
    record = _extrapolation_check(lm, reference, enc, hp, 10, parent, asked, parent_answers, 0, 1, torch.device("cpu"))

    tried = record["tried"]
    assert [t["factor"] for t in tried] == [1.0, 2.0, 3.0]
    assert all(sum(t["validation"][k] for k in ("wins", "ties", "losses")) == len(questions) for t in tried)
    assert "quiz" not in tried[0] and all(t["quiz"]["total"] == len(quiz.QUESTIONS) for t in tried[1:])
    assert [t["passed"] for t in tried[1:]] == [t["quiz"]["pct"] >= parent_pct - 1.5 for t in tried[1:]]
    passed = [t for t in tried if t["passed"]]
    best = max(passed, key=lambda t: (t["validation"]["wins"], -t["validation"]["losses"], -t["factor"]))
    assert record["kept_factor"] == best["factor"]
    if parent_pct == 90.0:
        assert record["kept_factor"] == 1.0
    start = {n: p.detach() for n, p in reference.named_parameters() if n in kept}
    want = extrapolated(start, kept, record["kept_factor"])
    assert all(torch.allclose(p, want[n]) for n, p in lm.named_parameters() if n in want)
