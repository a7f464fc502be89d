"""Answer quality as a user sees it: prompts with expected keywords, and a loop detector.

The build's gate (:mod:`model.quality`) scores the bare model greedy; this judges what comes
back through the whole pipeline (hidden instructions, served sampling defaults, the engine's
repetition guard), where issue 14 saw "Bonjour, bonjour! ..." repeated until ``max_tokens``.
Pure functions and data only, so the pipeline test (``tests/pipeline/test_answer_quality.py``)
and a benchmark judge the same way.

An answer is a hit when it contains any of its prompt's keywords, case-insensitively, on word
boundaries (the gate's matcher); a keyword ending in ``*`` is a word prefix ("bed*" matches
"bedtime"), which keeps tip keywords fair without listing every inflection. No keyword is found
in its own prompt (a test checks), so an answer that only restates the request ("The user asked
for a tip on sleeping better") does not score. An answer *loops* when one word trigram occurs
more than :data:`MAX_TRIGRAM_REPEATS` times.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from model.quality import is_correct

MAX_TRIGRAM_REPEATS = 3  # an answer with any word trigram more often than this is a loop
MAX_TOKENS = 48  # enough for a short answer or one tip; keeps a gate of 45 chats short
# Keyword hits the served build must reach, out of len(PROMPTS) = 45: between the fp32 build's
# greedy score and what the looping builder int4 scored (the measured scores are in
# docs/model.md, "The answer-quality gate").
MIN_HITS = 26


@dataclass(frozen=True)
class Prompt:
    """One user message and the keywords any one of which a good answer contains."""

    message: str
    expect: tuple[str, ...]
    kind: str = "question"  # question | tip | instruction


def _p(kind: str, rows: list[tuple[str, tuple[str, ...]]]) -> list[Prompt]:
    return [Prompt(message, expect, kind) for message, expect in rows]


PROMPTS: tuple[Prompt, ...] = tuple(
    _p("question", [
        ("What is the capital of France?", ("Paris",)),
        ("What is the capital of Japan?", ("Tokyo",)),
        ("What is the capital of Germany?", ("Berlin",)),
        ("What is the capital of Egypt?", ("Cairo",)),
        ("Which planet is known as the Red Planet?", ("Mars",)),
        ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
        ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
        ("What is the largest ocean on Earth?", ("Pacific",)),
        ("What do bees make?", ("honey",)),
        ("How many days are in a week?", ("7", "seven")),
        ("How many minutes are in an hour?", ("60", "sixty")),
        ("What is 2 plus 2?", ("4", "four")),
        ("What is frozen water called?", ("ice",)),
        ("What colour is the sky on a clear day?", ("blue",)),
        ("What is the largest planet in our solar system?", ("Jupiter",)),
        ("What is the opposite of hot?", ("cold",)),
        ("What is a baby cat called?", ("kitten",)),
        ("Which organ pumps blood around the body?", ("heart",)),
        ("What gas do plants take in from the air?", ("carbon dioxide", "CO2")),
        ("What is the fastest land animal?", ("cheetah",)),
        ("Who developed the theory of relativity?", ("Einstein",)),
        ("What language is spoken in Brazil?", ("Portuguese",)),
    ])
    + _p("tip", [
        ("Give me one tip for sleeping better.",
         ("sleep", "bed*", "caffeine", "screen*", "routine", "schedule", "dark*", "relax*", "nap*")),
        ("Give me a tip for staying healthy.",
         ("exercis*", "water", "eat*", "diet*", "sleep*", "fruit*", "vegetable*", "active", "walk*",
          "health")),
        ("Give me a tip for saving money.",
         ("budget*", "spend*", "save", "savings", "expens*", "bank*", "track*", "cost*")),
        ("Give me a tip for learning a new language.",
         ("practi*", "speak*", "listen*", "word*", "vocabulary", "native", "app*", "read*", "daily",
          "immers*")),
        ("Give me a tip for studying for an exam.",
         ("study", "break*", "note*", "review*", "schedule*", "sleep*", "practi*", "plan*")),
        ("Give me a tip for staying hydrated.", ("water", "drink*", "bottle*", "hydration", "fluid*")),
        ("Give me a tip for writing a good essay.",
         ("outline*", "thesis", "plan*", "structur*", "paragraph*", "clear*", "research*", "edit*",
          "topic*", "introduction")),
        ("How can I reduce stress?",
         ("breath*", "exercis*", "relax*", "meditat*", "sleep*", "walk*", "yoga", "break*", "mindful*")),
        ("Give me a tip for a job interview.",
         ("prepar*", "research*", "practi*", "dress*", "confiden*", "question*", "compan*", "employer*")),
        ("Give me a tip for cooking pasta.", ("water", "salt*", "boil*", "al dente", "sauce*")),
        ("How can I be more productive at work?",
         ("task*", "break*", "prioriti*", "list*", "focus*", "schedul*", "goal*", "distract*", "organi*")),
        ("Give me one tip for running.",
         ("warm*", "stretch*", "shoe*", "pace", "breath*", "water", "hydrat*", "slow*", "run", "runs")),
    ])
    + _p("instruction", [
        ("Say hello.", ("hello", "hi")),
        ("Reply with only the word yes.", ("yes",)),
        ("Translate 'thank you' into Spanish.", ("gracias",)),
        ("Count from 1 to 5.", ("1 2 3 4 5", "one two three four five")),
        ("Name a primary colour.", ("red", "blue", "yellow")),
        ("Name a fruit that is yellow.", ("banana*", "lemon*", "pineapple*", "mango*")),
        ("Write one sentence about the sea.",
         ("ocean*", "wave*", "water*", "beach*", "tide*", "salt*", "blue", "fish*", "ship*", "boat*",
          "shore*", "vast", "deep")),
        ("Name an animal that lives in the sea.",
         ("fish*", "whale*", "dolphin*", "shark*", "octop*", "crab*", "seal*", "turtle*", "jellyfish",
          "squid*", "starfish", "lobster*", "coral*", "sea lion*", "otter*")),
        ("Write a short poem about the moon.",
         ("lunar", "night*", "sky", "skies", "star*", "silver*", "glow*", "light*", "shin*", "bright*")),
        ("What day comes after Monday?", ("Tuesday",)),
        ("Finish the line: Twinkle, twinkle, little ...", ("star",)),
    ])
)


def keyword_hit(answer: str, expect: Iterable[str]) -> bool:
    """True when ``answer`` contains any expected keyword (``word*`` is a word prefix)."""
    folded = answer.casefold()
    exact = []
    for keyword in expect:
        if keyword.endswith("*"):
            stem = r"\W+".join(re.escape(w) for w in re.split(r"\W+", keyword[:-1].casefold()) if w)
            if re.search(rf"(?<!\w){stem}\w*", folded):
                return True
        else:
            exact.append(keyword)
    return is_correct(answer, exact)


def max_trigram_repeats(text: str) -> int:
    """How often the most frequent word trigram of ``text`` occurs (0 under three words)."""
    words = re.findall(r"\w+(?:'\w+)*", text.casefold())
    counts = Counter(zip(words, words[1:], words[2:], strict=False))
    return max(counts.values(), default=0)


def loops(text: str, limit: int = MAX_TRIGRAM_REPEATS) -> bool:
    """True when some word trigram occurs more than ``limit`` times: a degenerate loop."""
    return max_trigram_repeats(text) > limit


@dataclass
class Report:
    """The judgement of one set of answers: keyword hits, loops, and what went wrong where."""

    total: int
    hits: int
    looping: int
    misses: list[dict[str, str]] = field(default_factory=list)

    @property
    def hit_pct(self) -> float:
        return round(100.0 * self.hits / self.total, 1) if self.total else 0.0

    def summary(self) -> str:
        """One line for a test's or benchmark's output."""
        return (f"answer quality: {self.hits}/{self.total} keyword hits ({self.hit_pct}%), "
                f"{self.looping} answers repeat a trigram more than {MAX_TRIGRAM_REPEATS} times")

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "hits": self.hits, "hit_pct": self.hit_pct,
                "looping": self.looping, "misses": self.misses}


def judge(answers: Mapping[str, str], prompts: Iterable[Prompt] = PROMPTS) -> Report:
    """Judge ``answers`` (message -> answer text) against ``prompts``; a missing answer misses."""
    prompts = list(prompts)
    hits = looping = 0
    misses = []
    for prompt in prompts:
        answer = answers.get(prompt.message, "")
        hit, loop = keyword_hit(answer, prompt.expect), loops(answer)
        hits += hit
        looping += loop
        if not hit or loop:
            misses.append({"message": prompt.message, "answer": answer,
                           "why": ", ".join(w for w, bad in (("no keyword", not hit), ("loops", loop)) if bad)})
    return Report(total=len(prompts), hits=hits, looping=looping, misses=misses)
