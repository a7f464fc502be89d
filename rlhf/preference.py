"""The simulated labelers' preference rule: a transparent score of an answer to a question.

Not a model of human taste: a rule anyone can read, so simulated comparisons are
reproducible and the job's evaluation (parent vs child answers on held-out prompts) is judged
by the same rule that produced the training comparisons. Higher is better. Terms, each in
roughly [0, 1] and weighted by :class:`PreferenceWeights` (env overrides ``RLHF_PREF_*``):

* ``concise``: 1 up to ``target_words`` words, then falling linearly to 0 at three times that;
* ``on_topic``: share of the question's content words (3+ letters, not stop words) that the
  answer uses;
* ``full_stop``: 1 when the answer ends a sentence (``.``, ``!`` or ``?``);
* ``repetition`` (a penalty): share of the answer's word trigrams that repeat an earlier one;
* ``non_answer`` (a penalty, 1 or 0): the answer does not answer (:func:`non_answer`): a
  refusal, a deflection (only pleasantries about the exchange), a degenerate loop (the answer-quality check's
  :func:`model.answer_quality.loops`), a restatement that adds no word of its own to the
  question, or a long answer that touches none of the question's content words. The other
  terms can be gamed by a short, finished, non-repeating sentence that says nothing; this
  term is what such a sentence loses;
* ``correct``: share of the facts the question asks for that the answer states (:func:`correct`,
  the ``facts`` of ``rlhf/prompts.yaml``; 0 for every answer to a question with none listed, so
  it does not change their order). Without it "Rome." and "It is a city." score the same, and
  once answers are short, cutting more wins even when it cuts the fact;
* an empty answer scores ``-1`` whatever the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from pathlib import Path

import yaml

from model.answer_quality import loops
from services.common.config import env, load

WORD_RE = re.compile(r"[A-Za-z0-9']+")
_STOP_WORDS_TEXT = (
    "a an and are as at be but by can could did do does for from had has have how i if in into is it its me my "
    "of on or our please should so tell than that the their them then there these they this to was we were what "
    "when where which who why will with would you your about give explain write")
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())
USER_TURN_RE = re.compile(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|$)", re.S)
# Openings that decline or deflect instead of answering (matched on the answer's start, lower-cased).
REFUSAL_RE = re.compile(
    r"^\W*(?:sorry\b|i'?m sorry\b|i am sorry\b|i (?:can ?not|can't|cannot|won't|am unable to|am not able to|"
    r"don't know|do not know)\b|as an ai\b|i'?m (?:just )?an ai\b|i'?m not (?:able|sure)\b|"
    r"unfortunately,? i\b|i have no (?:idea|information)\b)")
# Sentences about the exchange rather than its subject; an answer made only of them deflects
# ("You're looking for a simple answer?", "Hello, I'm glad to assist you with your question.":
# what the first real-model PPO child said instead of answering, bench/results/rlhf_real.md).
DEFLECTION_RE = re.compile(
    r"glad to (?:assist|help|hear)|happy to (?:assist|help)|your question|you'?re (?:not alone|looking for)|"
    r"i'?m here to|hope (?:this|that) helps|let me know|great question|good question")
SENTENCE_RE = re.compile(r"[^.!?]+[.!?]*")
PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.yaml"
# An answer this many words long that shares no content word with the question is off topic
# (a shorter one such as "Paris." may answer without repeating the question's words).
OFF_TOPIC_MIN_WORDS = 6


@dataclasses.dataclass(frozen=True)
class PreferenceWeights:
    """How much each term counts (the rule's whole configuration)."""

    concise: float = env("RLHF_PREF_CONCISE", 1.0)
    on_topic: float = env("RLHF_PREF_ON_TOPIC", 1.0)
    full_stop: float = env("RLHF_PREF_FULL_STOP", 0.5)
    repetition: float = env("RLHF_PREF_REPETITION", 1.0)
    # 1.5 cancels what a short finished sentence earns from concise + full_stop alone, so "I cannot
    # help with that." scores 0, below any answer that touches the question.
    non_answer: float = env("RLHF_PREF_NON_ANSWER", 1.5)
    # As much as on_topic: stating what was asked counts as much as touching the question's words.
    correct: float = env("RLHF_PREF_CORRECT", 1.0)
    target_words: int = env("RLHF_PREF_TARGET_WORDS", 30, check=lambda v: v > 0, hint="words > 0")


DEFAULT_WEIGHTS = PreferenceWeights()


def weights_from_env() -> PreferenceWeights:
    """The weights with ``RLHF_PREF_*`` overrides applied."""
    return load(PreferenceWeights)


def question_of(prompt: str) -> str:
    """The last user message of a ChatML prompt (the dataset stores the prompt as the model saw
    it); plain text is returned as is."""
    turns = USER_TURN_RE.findall(prompt)
    return turns[-1] if turns else prompt


def words(text: str) -> list[str]:
    """Lower-cased words."""
    return [w.lower() for w in WORD_RE.findall(text)]


def content_words(text: str) -> set[str]:
    """Words of 3+ letters that are not stop words (what a question is about)."""
    return {w for w in words(text) if len(w) >= 3 and w not in STOP_WORDS}


def non_answer(prompt: str, answer: str) -> str | None:
    """Why ``answer`` does not answer (the last question of) ``prompt``, or None when it may.

    ``empty``, ``refusal`` (declines: "I'm sorry, I can't...", "As an AI..."), ``deflects``
    (every sentence is about the exchange, :data:`DEFLECTION_RE`: "I'm glad to assist you with
    your question."),
    ``loop`` (a word trigram more than :data:`model.answer_quality.MAX_TRIGRAM_REPEATS` times),
    ``restates`` (no word the question did not already have, e.g. "The capital of France?"),
    ``off_topic`` (:data:`OFF_TOPIC_MIN_WORDS` words or more, none of them a content word of
    the question, and none of its facts). A check on form, not on truth: "Paris is in Italy." passes.
    """
    answer_words = words(answer)
    if not answer_words:
        return "empty"
    folded = answer.strip().lower().replace("\u2019", "'")
    if REFUSAL_RE.search(folded):
        return "refusal"
    sentences = [t for t in SENTENCE_RE.findall(folded) if words(t)]
    if sentences and all(DEFLECTION_RE.search(t) for t in sentences):
        return "deflects"
    if loops(answer):
        return "loop"
    question_words = set(words(question_of(prompt)))
    if set(answer_words) <= question_words | STOP_WORDS:
        return "restates"
    topic = content_words(question_of(prompt))
    if (topic and len(answer_words) >= OFF_TOPIC_MIN_WORDS and not topic & set(answer_words)
            and not correct(question_of(prompt), answer)):  # a stated fact is on topic in other words
        return "off_topic"
    return None


@functools.cache
def facts(path: Path = PROMPTS_FILE) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Question -> the groups of alternatives a correct answer mentions (``facts`` in the file)."""
    table = yaml.safe_load(path.read_text(encoding="utf-8")).get("facts") or {}
    return {q.strip(): tuple(tuple(str(a).lower() for a in group) for group in groups)
            for q, groups in table.items()}


def correct(question: str, answer: str) -> float:
    """Share of the question's fact groups the answer meets: a group is met by a word of the
    answer that starts with one of its alternatives ("scatter" meets "scattering"), or, for an
    alternative of several words, by the answer containing it. 0 for a question with no facts."""
    groups = facts().get(question.strip())
    if not groups:
        return 0.0
    answer_words = words(answer)
    text = " ".join(answer_words)

    def met(alt: str) -> bool:
        if " " in alt:
            return f" {alt}" in f" {text}"
        return any(w.startswith(alt) for w in answer_words)

    return sum(any(met(a) for a in group) for group in groups) / len(groups)


def terms(prompt: str, answer: str, target_words: int = 30) -> dict[str, float]:
    """Each term of the rule, unweighted (for reports and tests)."""
    answer_words = words(answer)
    count = len(answer_words)
    concise = 1.0 if count <= target_words else max(0.0, 1.0 - (count - target_words) / (2 * target_words))
    topic = content_words(question_of(prompt))
    on_topic = len(topic & set(answer_words)) / len(topic) if topic else 0.0
    full_stop = 1.0 if answer.rstrip().endswith((".", "!", "?")) else 0.0
    trigrams = [tuple(answer_words[i:i + 3]) for i in range(max(0, count - 2))]
    repetition = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    return {"concise": concise, "on_topic": on_topic, "full_stop": full_stop, "repetition": repetition,
            "non_answer": 0.0 if non_answer(prompt, answer) is None else 1.0,
            "correct": correct(question_of(prompt), answer)}


def best_score(prompt: str, weights: PreferenceWeights = DEFAULT_WEIGHTS) -> float:
    """The most any answer to (the last question of) ``prompt`` can score: every bonus term at 1
    (``on_topic`` and ``correct`` only where the question has content words and facts), no penalty.
    A parent's answer there can only be tied, so the count of such answers is a round's ceiling."""
    question = question_of(prompt)
    return (weights.concise + weights.full_stop + (weights.on_topic if content_words(question) else 0.0)
            + (weights.correct if facts().get(question.strip()) else 0.0))


def score(prompt: str, answer: str, weights: PreferenceWeights = DEFAULT_WEIGHTS) -> float:
    """The rule's score of ``answer`` to (the last question of) ``prompt``; higher is better."""
    if not answer.strip():
        return -1.0
    parts = terms(prompt, answer, weights.target_words)
    return (weights.concise * parts["concise"] + weights.on_topic * parts["on_topic"]
            + weights.full_stop * parts["full_stop"] - weights.repetition * parts["repetition"]
            - weights.non_answer * parts["non_answer"] + weights.correct * parts["correct"])


def rank(prompt: str, answers: list[str], weights: PreferenceWeights = DEFAULT_WEIGHTS) -> list[int]:
    """Candidate indexes best first (ties keep the candidates' order, so ranking is deterministic;
    :func:`tied_with_next` says which neighbours are ties)."""
    return order_of([score(prompt, a, weights) for a in answers])


def order_of(scores: list[float]) -> list[int]:
    """:func:`rank` for answers already scored (a caller that also keeps the scores scores once)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def tied_with_next(order: list[int], scores: list[float]) -> list[bool]:
    """The ranking's ties (``Ranking.tied_with_next``): order[i] and order[i + 1] scored the same.
    Submitted with the ranking so training takes no preference between them: the candidates'
    order that breaks a tie in :func:`rank` is the sampling order, not a judgement."""
    return [math.isclose(scores[a], scores[b], rel_tol=0.0, abs_tol=1e-9) for a, b in itertools.pairwise(order)]
