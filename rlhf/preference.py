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
* an empty answer scores ``-1`` whatever the weights.
"""

from __future__ import annotations

import dataclasses
import re

from services.common.config import env, load

WORD_RE = re.compile(r"[A-Za-z0-9']+")
_STOP_WORDS_TEXT = (
    "a an and are as at be but by can could did do does for from had has have how i if in into is it its me my "
    "of on or our please should so tell than that the their them then there these they this to was we were what "
    "when where which who why will with would you your about give explain write")
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())
USER_TURN_RE = re.compile(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|$)", re.S)


@dataclasses.dataclass(frozen=True)
class PreferenceWeights:
    """How much each term counts (the rule's whole configuration)."""

    concise: float = env("RLHF_PREF_CONCISE", 1.0)
    on_topic: float = env("RLHF_PREF_ON_TOPIC", 1.0)
    full_stop: float = env("RLHF_PREF_FULL_STOP", 0.5)
    repetition: float = env("RLHF_PREF_REPETITION", 1.0)
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


def terms(prompt: str, answer: str, target_words: int = 30) -> dict[str, float]:
    """Each term of the rule, unweighted (for reports and tests)."""
    answer_words = words(answer)
    count = len(answer_words)
    concise = 1.0 if count <= target_words else max(0.0, 1.0 - (count - target_words) / (2 * target_words))
    topic = {w for w in words(question_of(prompt)) if len(w) >= 3 and w not in STOP_WORDS}
    on_topic = len(topic & set(answer_words)) / len(topic) if topic else 0.0
    full_stop = 1.0 if answer.rstrip().endswith((".", "!", "?")) else 0.0
    trigrams = [tuple(answer_words[i:i + 3]) for i in range(max(0, count - 2))]
    repetition = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    return {"concise": concise, "on_topic": on_topic, "full_stop": full_stop, "repetition": repetition}


def score(prompt: str, answer: str, weights: PreferenceWeights = DEFAULT_WEIGHTS) -> float:
    """The rule's score of ``answer`` to (the last question of) ``prompt``; higher is better."""
    if not answer.strip():
        return -1.0
    parts = terms(prompt, answer, weights.target_words)
    return (weights.concise * parts["concise"] + weights.on_topic * parts["on_topic"]
            + weights.full_stop * parts["full_stop"] - weights.repetition * parts["repetition"])


def rank(prompt: str, answers: list[str], weights: PreferenceWeights = DEFAULT_WEIGHTS) -> list[int]:
    """Candidate indexes best first (ties keep the candidates' order, so ranking is deterministic)."""
    scores = [score(prompt, a, weights) for a in answers]
    return sorted(range(len(answers)), key=lambda i: (-scores[i], i))
