"""Chunking of a streamed answer: stable as the text grows, and the release/cut logic."""

from __future__ import annotations

import random

from colloquy.v1 import common_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from services.moderation import streaming
from services.moderation.policy import ALLOW, BLOCK, WARN

TEXT = ("The first sentence is here. And then a second one follows it! Is this the third? "
        "Yes.\nA new line starts a chunk too. " + "word " * 80 + "end.")


def test_chunks_end_at_sentence_ends_and_cover_the_text() -> None:
    ends = streaming.chunk_ends(TEXT, 20, 60, final=True)
    assert ends[-1] == len(TEXT)
    assert ends == sorted(set(ends))
    assert TEXT[ends[0] - 1] == "." and TEXT[ends[0]].isspace()
    for a, b in zip([0, *ends], ends, strict=False):
        assert b - a <= 2 * 60


def test_the_unchecked_tail_is_held_back_until_final() -> None:
    text = "Short sentence one. Short sentence two. and an unfinished tail"
    ends = streaming.chunk_ends(text, 10, 200)
    assert ends and ends[-1] < len(text)
    assert streaming.chunk_ends(text, 10, 200, final=True)[-1] == len(text)


def test_text_without_whitespace_is_cut_hard() -> None:
    text = "x" * 500
    assert streaming.chunk_ends(text, 10, 100) == [200, 400]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab .!?\n", min_size=0, max_size=600), st.integers(1, 40), st.integers(0, 60),
       st.integers(0, 30))
def test_chunk_ends_never_move_as_text_grows(text: str, min_chars: int, extra: int, first: int) -> None:
    max_chars = min_chars + extra
    full = streaming.chunk_ends(text, min_chars, max_chars, first_chars=first)
    for cut in range(0, len(text) + 1, 7):
        prefix = streaming.chunk_ends(text[:cut], min_chars, max_chars, first_chars=first)
        assert prefix == full[:len(prefix)], "a boundary moved when the text grew"


def test_the_first_chunk_is_short_and_ends_between_words() -> None:
    text = "Sure, here are the steps you asked for. First, take the thing. Then do more."
    ends = streaming.chunk_ends(text, 40, 80, first_chars=10)
    assert ends[0] == text.index(" ", 10)  # "Sure, here" + " ": the first word boundary past 10
    assert ends[1] - ends[0] >= 40  # later chunks keep their size
    assert streaming.chunk_ends(text, 40, 80)[0] > 40  # without it, the first chunk is a full one


def test_the_first_chunk_never_splits_a_word() -> None:
    """With 4 characters, "The primary ..." was checked as "The prim" (hard at twice 4)."""
    text = "The primary colour is red. It is one of the three."
    assert streaming.chunk_ends(text, 64, 200, first_chars=4)[0] == len("The primary")
    assert streaming.chunk_ends("The primar", 64, 200, first_chars=4) == []  # the word may go on
    assert streaming.chunk_ends("Sure, here", 64, 200, first_chars=4)[0] == len("Sure,")
    assert streaming.chunk_ends("x" * 500, 64, 200, first_chars=4) == [200]  # no spaces: hard at max_chars


def test_windows_overlap_the_previous_chunk() -> None:
    text = "aaaa. bbbb. cccc. dddd."
    ends = streaming.chunk_ends(text, 4, 10, final=True)
    wins = streaming.windows(text, ends)
    assert wins[0] == text[:ends[0]]
    assert wins[2] == text[ends[0]:ends[2]]


def _verdict(action: int, score: float = 0.0) -> common_pb2.ModerationResult:
    r = common_pb2.ModerationResult(action=action, flagged=action != ALLOW, policy_version="t")
    r.category_scores["violence"] = score
    return r


def _combine(results: list[common_pb2.ModerationResult]) -> common_pb2.ModerationResult:
    return max(results, key=lambda r: r.category_scores["violence"])


def test_release_stops_before_the_first_blocked_chunk() -> None:
    text = "Fine sentence one here. Fine sentence two here. BAD sentence three. Fine four here."

    def verdicts(wins: list[str], prefixes: list[str]) -> list[common_pb2.ModerationResult]:
        return [_verdict(BLOCK, 0.9) if "BAD" in w else _verdict(ALLOW) for w in wins]

    check = streaming.check_candidate(text, True, verdicts, _combine, 10, 40)
    assert check.blocked is not None and check.complete
    assert "BAD" not in check.released
    assert check.released.startswith("Fine sentence one here.")
    assert check.overall is not None and check.overall.category_scores["violence"] > 0.5


def test_warned_chunks_are_released_with_a_warning() -> None:
    text = "Calm sentence here. Edgy sentence here. Calm again, the end."
    check = streaming.check_candidate(
        text, True, lambda ws, _: [_verdict(WARN if "Edgy" in w else ALLOW) for w in ws], _combine, 10, 40)
    assert check.blocked is None and check.released == text and check.warned is not None


def test_a_short_first_chunk_warns_only_when_the_next_window_still_does() -> None:
    text = "To abort a merge, run git merge --abort. That is all."
    first_only = lambda ws, _: [_verdict(WARN if w == "To abort" else ALLOW) for w in ws]  # noqa: E731
    for done in (False, True):  # growing or finished, the fragment's warning waits for its sentence
        check = streaming.check_candidate(text, done, first_only, _combine, 10, 40, first_chars=4)
        assert check.released == text[:len(check.released)] and check.warned is None
    both = lambda ws, _: [_verdict(WARN if "abort" in w else ALLOW) for w in ws]  # noqa: E731
    check = streaming.check_candidate(text, True, both, _combine, 10, 40, first_chars=4)
    assert check.warned is not None  # the next window, which holds the first chunk, still warns
    whole = streaming.check_candidate("To abort", True, first_only, _combine, 10, 40, first_chars=4)
    assert whole.warned is not None  # the first chunk is the whole answer: nothing judges it again
    block = lambda ws, _: [_verdict(BLOCK if w == "To abort" else ALLOW) for w in ws]  # noqa: E731
    cut = streaming.check_candidate(text, False, block, _combine, 10, 40, first_chars=4)
    assert cut.blocked is not None and cut.released == ""  # blocks stand at once


def test_random_growth_releases_a_growing_prefix() -> None:
    rng = random.Random(0)
    text = " ".join(rng.choice(["alpha", "beta.", "gamma!", "delta\n"]) for _ in range(200))
    released = ""
    for cut in range(0, len(text), 13):
        check = streaming.check_candidate(text[:cut], False, lambda ws, _: [_verdict(ALLOW) for _ in ws],
                                          _combine, 30, 90)
        assert check.released.startswith(released) and text.startswith(check.released)
        released = check.released


def test_stream_first_releases_everything_then_cuts_like_hold() -> None:
    growing = "Fine sentence one here. Fine sentence two here. half a senten"
    allow = lambda ws, _: [_verdict(ALLOW) for _ in ws]  # noqa: E731
    held = streaming.check_candidate(growing, False, allow, _combine, 10, 40)
    first = streaming.check_candidate(growing, False, allow, _combine, 10, 40, stream_first=True)
    assert first.released == growing and held.released != growing  # the unchecked tail goes out too

    text = "Fine sentence one here. Fine sentence two here. BAD sentence three. Fine four here."

    def verdicts(wins: list[str], prefixes: list[str]) -> list[common_pb2.ModerationResult]:
        return [_verdict(BLOCK, 0.9) if "BAD" in w else _verdict(ALLOW) for w in wins]

    cut = streaming.check_candidate(text, True, verdicts, _combine, 10, 40, stream_first=True)
    same = streaming.check_candidate(text, True, verdicts, _combine, 10, 40)
    assert cut.blocked is not None and cut.released == same.released and "BAD" not in cut.released


def test_stream_first_holds_from_a_suspect_chunk_on() -> None:
    text = "Fine sentence one here. Odd sentence two here. and an unchecked tail"
    verdicts = lambda ws, _: [_verdict(ALLOW, 0.3 if "Odd" in w else 0.0) for w in ws]  # noqa: E731
    check = streaming.check_candidate(text, False, verdicts, _combine, 10, 40, stream_first=True,
                                      hold=lambda r: r.category_scores["violence"] >= 0.2)
    assert check.released == text[:text.index(" and")]  # checked prefix only: the tail waits
