"""How many encoder runs a text costs, and that bounding them still checks all of its text.

Before the bound, a long text was cut into every sentence and every pair of adjacent sentences:
an 8 KiB "a. a. a." message was 5,459 encoder runs (about 25 s of CPU on one core).
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator

import pytest

from services.moderation.domain import Moderator
from services.moderation.embedder import MAX_WINDOWS, Embedder, Window

HOSTILE_REPEATED = ("a. " * 2731)[:8192]


def _random_words(size: int, end: str, seed: int = 7) -> str:
    """`size` characters of short random words, each followed by `end`: no two windows repeat."""
    rng = random.Random(seed)
    words: list[str] = []
    length = 0
    while length < size:
        words.append("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 5))) + end)
        length += len(words[-1]) + 1
    return " ".join(words)[:size]


HOSTILE_DISTINCT = _random_words(8192, ".")  # 8 KiB of short, all-different sentences


@pytest.fixture
def runs(moderator: Moderator, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Window]]:
    """Every window the real encoder is run on, in order."""
    seen: list[Window] = []
    real = moderator.embedder._run

    def counting(window: Window):  # type: ignore[no-untyped-def]
        seen.append(window)
        return real(window)

    monkeypatch.setattr(moderator.embedder, "_run", counting)
    yield seen


def _covered(text: str, windows: list[Window]) -> set[int]:
    """Offsets of the non-space characters of `text` that some window spans."""
    return {i for w in windows for i in range(w.start, w.end) if not text[i].isspace()}


def _non_space(text: str) -> set[int]:
    return {i for i, ch in enumerate(text) if not ch.isspace()}


def test_8kib_repeated_tiny_sentences_cost_at_most_64_encoder_runs(moderator: Moderator,
                                                                   runs: list[Window]) -> None:
    [result] = moderator.moderate([HOSTILE_REPEATED])
    assert 0 < len(runs) <= 64
    assert not result.flagged


def test_8kib_distinct_tiny_sentences_cost_at_most_64_runs_and_every_character_is_checked(
        moderator: Moderator, runs: list[Window]) -> None:
    assert len(moderator.embedder.windows([HOSTILE_DISTINCT])) <= MAX_WINDOWS
    moderator.moderate([HOSTILE_DISTINCT])
    assert 0 < len(runs) <= 64
    assert _covered(HOSTILE_DISTINCT, runs) == _non_space(HOSTILE_DISTINCT)
    assert max(len(w.ids) for w in runs) <= 512  # the encoder's positions


def test_8kib_without_sentence_ends_is_bounded_and_fully_checked(moderator: Moderator,
                                                                 runs: list[Window]) -> None:
    text = _random_words(8192, "")
    moderator.moderate([text])
    assert 0 < len(runs) <= 64
    assert _covered(text, runs) == _non_space(text)


def test_harm_hidden_in_8kib_of_repeated_padding_is_still_found(moderator: Moderator) -> None:
    half = "a. " * 1300
    [result] = moderator.moderate([half + "Immigrants are subhuman parasites ruining everything. " + half])
    assert result.categories["hate"]


def test_a_normal_long_message_is_checked_sentence_by_sentence_and_pair_by_pair_as_before(
        moderator: Moderator) -> None:
    """Under the bound nothing changes: every sentence and every adjacent pair is a window."""
    sentences = ["The weather was mild and we walked along the river.", "We talked about books.",
                 "Then we had lunch at a small cafe near the old bridge.", "It rained later.",
                 "My sister called to ask about the trip next week!", "Do you want to come along?",
                 "The train leaves early on Saturday morning, so we should pack the night before.",
                 "Bring a warm coat, good shoes and something to read on the way."]
    text = " ".join(sentences)
    starts = [text.index(s) for s in sentences]
    spans = [(a, a + len(s)) for a, s in zip(starts, sentences, strict=True)]
    want = spans + [(spans[k][0], spans[k + 1][1]) for k in range(len(spans) - 1)]
    got = [(w.start, w.end) for w in moderator.embedder.windows([text])]
    assert len(got) > 1
    assert sorted(got) == sorted(want)


def test_identical_windows_of_a_text_are_embedded_once(moderator: Moderator, runs: list[Window]) -> None:
    text = "Bake the bread for an hour. " * 12
    moderator.moderate([text])
    assert len(runs) == 2  # "Bake the bread for an hour." and the pair of two of them


def test_text_beyond_what_64_full_windows_hold_is_refused(moderator: Moderator) -> None:
    embedder: Embedder = moderator.embedder
    with pytest.raises(ValueError, match="too long to moderate"):
        embedder.windows([_random_words(MAX_WINDOWS * 512 * 4, "")])
