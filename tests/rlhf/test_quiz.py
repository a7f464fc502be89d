"""Knowledge checks during DPO (rlhf.quiz): the quiz a torch policy answers, and which checkpoint a
run keeps."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.quality import QUESTIONS, Question, is_correct
from rlhf import quiz


def _check(step: int, passed: bool) -> quiz.QuizCheck:
    return quiz.QuizCheck(step, 0, 1, 0.0, passed)


def test_check_passes_within_the_points_of_the_parent() -> None:
    parent = quiz.check(0, 146, 184, None)
    assert parent.passed and parent.pct == pytest.approx(79.35)
    assert quiz.check(16, 145, 184, parent, points=1.0).passed  # 78.80: 0.54 below
    assert not quiz.check(32, 142, 184, parent, points=1.0).passed  # 77.17: 2.2 below
    assert quiz.check(32, 142, 184, parent, points=2.5).passed
    assert quiz.check(48, 150, 184, parent, points=0.0).passed  # above the parent passes


def test_the_last_checkpoint_that_passed_is_kept() -> None:
    assert quiz.kept_step([]) is None
    assert quiz.kept_step([_check(16, True), _check(32, True)]) == 32
    assert quiz.kept_step([_check(16, True), _check(32, False), _check(40, False)]) == 16
    assert quiz.kept_step([_check(16, True), _check(32, True), _check(40, False)]) == 32
    assert quiz.kept_step([_check(16, False), _check(32, False)]) is None
    # a later pass after a failure: the run keeps its last weights
    assert quiz.kept_step([_check(16, False), _check(32, True)]) == 32


@pytest.fixture(scope="module")
def small_lm_and_tokenizer() -> tuple[LlamaForCausalLM, object, int]:
    from tokenizers import Tokenizer

    from model.tiny import cached_tiny_model

    tokenizer = Tokenizer.from_file(str(cached_tiny_model() / "tokenizer.json"))
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=True, initializer_range=1.0)).eval()
    return lm, tokenizer, tokenizer.token_to_id("<|im_end|>")


def _answers_one_by_one(lm: LlamaForCausalLM, tokenizer: object, eos: int, questions: list[Question]) -> int:
    from model.chat_template import render_chatml

    correct = 0
    for q in questions:
        ids = torch.tensor([tokenizer.encode(render_chatml(q.messages()), add_special_tokens=False).ids])
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                          pad_token_id=eos, eos_token_id=eos)[0, ids.shape[1]:].tolist()
        correct += is_correct(tokenizer.decode(out[:out.index(eos)] if eos in out else out), q.accept)
    return correct


def test_quiz_score_batched_equals_one_by_one_and_shards_add_up(small_lm_and_tokenizer: tuple) -> None:
    lm, tokenizer, eos = small_lm_and_tokenizer
    # Questions whose accepted answer is the last word of the small random model's own greedy answer
    # (wide random weights: varied words), so the score is not 0 by chance; batching and left
    # padding must not change an answer.
    asked = list(QUESTIONS[:6])
    own = []
    from model.chat_template import render_chatml

    for q in asked:
        ids = torch.tensor([tokenizer.encode(render_chatml(q.messages()), add_special_tokens=False).ids])
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                          pad_token_id=eos, eos_token_id=eos)[0, ids.shape[1]:].tolist()
        words = [w for w in tokenizer.decode(out[:out.index(eos)] if eos in out else out).split() if w.isalnum()]
        own.append(Question(q.prompt, (words[-1],) if words else ("zzz-never",)))
    expected = _answers_one_by_one(lm, tokenizer, eos, own)
    assert expected == len(own)
    score, total = quiz.quiz_score(lm, tokenizer, eos, torch.device("cpu"), questions=own, batch_size=4,
                                   max_new_tokens=6)
    assert (score, total) == (expected, len(own))
    halves = [quiz.quiz_score(lm, tokenizer, eos, torch.device("cpu"), questions=own, batch_size=4,
                              max_new_tokens=6, rank=r, world=2) for r in (0, 1)]
    assert sum(s for s, _ in halves) == score and sum(n for _, n in halves) == total
    assert not lm.training  # left as it was
