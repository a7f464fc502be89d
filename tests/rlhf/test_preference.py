"""The simulated labelers' rule: each term on hand-checked answers."""

from __future__ import annotations

import pytest

from model.chat_template import render_chatml
from rlhf import preference
from rlhf.preference import PreferenceWeights, non_answer, question_of, rank, score, terms

Q = "What is the capital of France?"


def test_terms_on_hand_checked_answers() -> None:
    # content words of the question: {capital, france} ("what", "the", "of" are stop words)
    assert terms(Q, "The capital of France is Paris.") == {
        "concise": 1.0, "on_topic": 1.0, "full_stop": 1.0, "repetition": 0.0, "non_answer": 0.0, "correct": 1.0}
    # "paris" shares no content word; no full stop
    assert terms(Q, "Paris")["on_topic"] == 0.0 and terms(Q, "Paris")["full_stop"] == 0.0
    # 6 words -> 4 trigrams: (a b a) (b a b) (a b a) (b a b): 2 distinct -> repetition 1 - 2/4 = 0.5
    assert terms(Q, "a b a b a b")["repetition"] == 0.5
    # 60 words with target 30: 1 - (60 - 30) / 60 = 0.5
    assert terms(Q, " ".join(f"w{i}" for i in range(60)), target_words=30)["concise"] == 0.5


def test_score_weights_and_empty_answers() -> None:
    # 1 (concise) + 1 (on topic) + 0.5 (full stop) - 0 (repetition) + 1 (correct) = 3.5
    assert score(Q, "The capital of France is Paris.") == pytest.approx(3.5)
    assert score(Q, "   ") == -1.0
    only_stop = PreferenceWeights(concise=0.0, on_topic=0.0, full_stop=2.0, repetition=0.0, non_answer=0.0,
                                  correct=0.0, target_words=30)
    assert score(Q, "Paris.", only_stop) == 2.0
    assert score(Q, "Paris", only_stop) == 0.0


def test_rank_is_best_first_and_stable_on_ties() -> None:
    answers = ["Paris", "The capital of France is Paris.", "capital capital capital capital capital", "Paris"]
    assert rank(Q, answers) == [1, 0, 3, 2]
    # the two "Paris" answers tie: the ranking says so, so training takes no pair between them
    order = rank(Q, answers)
    scores = [score(Q, a) for a in answers]
    assert preference.tied_with_next(order, scores) == [False, True, False]
    assert preference.order_of(scores) == order, "the labellers rank by the scores they already have"


def test_the_question_is_read_out_of_a_chatml_prompt() -> None:
    prompt = render_chatml([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": Q}])
    assert question_of(prompt) == Q
    assert score(prompt, "The capital of France is Paris.") == score(Q, "The capital of France is Paris.")


def test_weights_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_PREF_FULL_STOP", "3")
    assert preference.weights_from_env().full_stop == 3.0


# Greedy held-out answers of the first real-model run (bench/results/rlhf_real.json): the PPO child
# won 18 of 24 under the four-term rule partly by saying short, finished sentences that answer nothing.
REAL_CHILD_NON_ANSWERS = [
    ("How do trees drink water?", "You're looking for a simple answer?"),
    ("What is electricity?", "Hello, I'm glad to assist you with your question."),
    ("Why is the ocean salty?", "You're not alone in this vast and wondrous world of the ocean."),
    ("How can I stay calm before an exam?", "You're not alone, I'm not here to judge you."),
    ("Why do stars twinkle?", "I'm so glad to hear that you enjoyed the story of stars twinkling in the night sky."),
]


@pytest.mark.parametrize(("question", "answer"), REAL_CHILD_NON_ANSWERS)
def test_real_deflections_are_non_answers(question: str, answer: str) -> None:
    assert non_answer(question, answer) == "deflects"
    assert terms(question, answer)["non_answer"] == 1.0
    # the penalty (1.5) takes back what concise (1) + full stop (0.5) gave: at most the topic share
    assert score(question, answer) <= terms(question, answer)["on_topic"] + 1e-9


def test_real_answers_that_answer_pass() -> None:
    assert non_answer("What is the capital of Italy?", "The capital of Italy is Rome-Italy.") is None
    # a pleasantry followed by an attempt at the question is not a deflection (however wrong)
    parent = ("I'm glad to assist you with your question. The answer to this question is simple yet profound. "
              "The reason stars twinkle is because of the universe's infinite, eternal, and eternal multiverse.")
    assert non_answer("Why do stars twinkle?", parent) is None
    assert non_answer(Q, "Paris.") is None  # short answers need not repeat the question's words


def test_other_kinds_of_non_answer() -> None:
    parent = ("Il capital di Sardinia è Roma, il capital di Sardinia è Roma, il capital di Sardinia è Roma, "
              "il capital di Sardinia è Roma, il")  # the real parent's greedy answer, cut
    assert non_answer("What is the capital of Italy?", parent) == "loop"
    assert non_answer(Q, "I'm sorry, but I cannot answer that.") == "refusal"
    assert non_answer(Q, "As an AI, I do not have opinions.") == "refusal"
    assert non_answer(Q, "The capital of France?") == "restates"
    assert non_answer(Q, "Bananas are yellow and grow in warm tropical places.") == "off_topic"
    assert non_answer(Q, "...") == "empty"


def test_an_answer_beats_a_polished_non_answer() -> None:
    answers = ["I'm glad to assist you with your question.", "Paris.", "I cannot help with that."]
    assert rank(Q, answers)[0] == 1
    assert score(Q, "I cannot help with that.") == pytest.approx(0.0)  # 1 + 0 + 0.5 - 0 - 1.5


def test_correct_counts_the_facts_a_question_asks_for() -> None:
    """Before the term, "It is a city." tied with "Rome." and a child could win by dropping facts."""
    italy = "What is the capital of Italy?"
    assert score(italy, "Rome.") > score(italy, "It is a city.")
    sky = "Why is the sky blue?"  # three groups: scatter; sunlight/light; shorter/wavelength/blue light
    assert preference.correct(sky, "Sunlight is scattered by air molecules.") == pytest.approx(2 / 3)
    assert preference.correct(sky, "Blue light has a shorter wavelength and scatters more.") == 1.0
    assert preference.correct(sky, "Because it is blue.") == 0.0
    assert preference.correct("A question nobody listed?", "Paris.") == 0.0  # no facts: no change in order
    # a multi-word alternative is matched as a phrase, not word by word
    assert preference.correct("What is the largest animal on Earth?", "The blue whale.") == 1.0
    assert preference.correct("What is the largest animal on Earth?", "A whale, blue and big.") == 0.0


def test_an_answer_that_states_the_facts_in_other_words_is_not_off_topic() -> None:
    ocean = "Why is the ocean salty?"  # content words {ocean, salty}: none below
    assert non_answer(ocean, "Rivers carry minerals from rocks into the sea.") is None
    assert non_answer(ocean, "Bananas are yellow and grow in warm tropical places.") == "off_topic"


def test_every_question_the_labellers_or_the_evaluation_use_has_facts() -> None:
    import yaml

    table = yaml.safe_load(preference.PROMPTS_FILE.read_text(encoding="utf-8"))
    listed = preference.facts()
    labelled = table["train"] + table["train_wide"]
    missing = [q for q in labelled + table["heldout"] + table["validation"] if not listed.get(q.strip())]
    assert not missing, f"rlhf/prompts.yaml: no facts for {missing}"
    # A checkpoint chosen on validation questions must not be judged on them, nor trained on them.
    train, heldout, validation = (set(table[k]) for k in ("train", "heldout", "validation"))
    assert not validation & heldout and not validation & train and not train & heldout
    # The wider training set (rlhf.labelers --questions train_wide) is asked of no evaluation or anchor either.
    train_wide = set(table["train_wide"])
    assert len(train_wide) == len(table["train_wide"]) > 100
    assert not train_wide & (train | heldout | validation | set(table["anchor"]) | set(table["heldout_wide"]))
    # The wider held-out set (rlhf.compare_versions) is scored by the same rule and shares no question.
    wide = set(table["heldout_wide"])
    assert len(wide) == len(table["heldout_wide"]) > 100
    assert not wide & (train | heldout | validation | set(table["anchor"]))
    assert all(listed.get(q.strip()) for q in wide)
    assert all(alt and alt == alt.strip() for groups in listed.values() for g in groups for alt in g)


def test_the_best_score_is_every_bonus_and_no_penalty_and_no_answer_passes_it() -> None:
    weights = PreferenceWeights()
    assert preference.best_score(Q) == pytest.approx(1.0 + 1.0 + 0.5 + 1.0)  # France has facts (Paris)
    assert score(Q, "The capital of France is Paris.") == pytest.approx(preference.best_score(Q))
    no_facts = "Tell me a joke about penguins."
    assert preference.best_score(no_facts) == pytest.approx(weights.concise + weights.on_topic + weights.full_stop)
    assert preference.best_score("Why?") == pytest.approx(weights.concise + weights.full_stop)  # no content words
    for answer in ("Paris.", "The capital of France is Paris, and France is in Europe.", "France capital Paris!",
                   "Paris " * 80):
        assert score(Q, answer) <= preference.best_score(Q) + 1e-9


def test_compare_versions_judges_each_child_against_its_parent_and_the_base() -> None:
    from rlhf.compare_versions import pairs

    assert pairs(["base", "r1"]) == [("base", "r1")]
    assert pairs(["base", "r1", "r2", "r3"]) == [("base", "r1"), ("r1", "r2"), ("r2", "r3"), ("base", "r2"),
                                                  ("base", "r3")]


def test_the_labellers_ask_the_training_lists_named_and_no_other() -> None:
    import yaml

    from rlhf.labelers import train_questions

    table = yaml.safe_load(preference.PROMPTS_FILE.read_text(encoding="utf-8"))
    assert train_questions() == table["train"]
    assert train_questions(lists=["train_wide"]) == table["train_wide"]
    assert train_questions(lists=["train", "train_wide"]) == table["train"] + table["train_wide"]
    for bad in (["heldout"], ["validation"], []):
        with pytest.raises(ValueError, match="training question lists are train, train_wide"):
            train_questions(lists=bad)
