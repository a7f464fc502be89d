"""Incremental output moderation of a streamed answer, as pure functions of the cumulative text.

An answer is released in chunks. Chunk ends are chosen from the text alone and never move as
the text grows (a boundary at position p depends only on text[:p+1]), so a stage that restarts,
or a redelivered batch, computes the same chunks and the same verdicts with no stored state.
Each chunk is checked together with the chunk before it (so a sentence split across a boundary
is still seen whole); the unchecked tail is held back until it completes a chunk or the answer
ends. The first chunk that the policy blocks cuts the answer at its start.

Stream first (`stream_first`): everything generated so far is released at once while the same
chunks are checked as they complete; the first blocked chunk cuts the answer at its start as in
hold mode, and the released text shrinks to that cut (the worker tells the client to withdraw
the rest). A `hold` test on each chunk's verdict (a hold category scored high) switches the rest
of the answer back to hold-and-check from that chunk on.

The first chunk may be shorter (`first_chars`, a word or a few): it is what a person waits for
before seeing anything, and an answer's opening is what the context check reads ("Sure, here are
the steps" after a harmful request), so checking it early costs little safety. Its *warnings* wait
for the next window, which holds it whole: the classifier reads two words poorly ("To abort", the
opening of an answer about `git merge --abort`, scored self-harm 0.74), a warning never stops text,
and the next window judges those words again with their sentence. So a short first chunk warns
only when it is the whole answer; its blocks (the context check) stand at once. Only the first:
growing the next chunks from it as well (8, 16, 32 characters, ...) cut 18 of 203 benign answers
(the served build's 184 quality-gate answers, `make demo`'s first, the benign context look-alikes)
against 9 with one 8-character chunk (8 with 4, the default; 11 with 24, 12 with 1), since a short
window judged with the user's message is easily read as something else; the harmful context pairs
are cut at their first chunk either way, 11 of 12 (`python -m bench.output_chunks`, 2026-12-04,
round-2 classifier; with round 3's the what-if cuts 5, one 4-character chunk 2). Since
2026-12-05 the first chunk always ends between words: it was hard at twice `first_chars`, which
split the second word of 136 of the 184 gate answers ("The capi"), and "The prim" of "The primary
colour is red." was blocked as illicit (`bench.output_chunks` with that answer: 3 -> 2 of 204
benign answers cut at 4 characters, 6 -> 5 at 1; harmful 12 of 12 either way). The price, in
hold mode: over those 184 answers the first chunk is complete after 3.21 generated tokens on
average instead of 2.43 (median 3 instead of 2; 136 answers wait for one to three more tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from colloquy.v1 import common_pb2

from services.moderation.policy import BLOCK, WARN

SENTENCE_END = ".!?"


def chunk_ends(text: str, min_chars: int, max_chars: int, final: bool = False,
               first_chars: int = 0) -> list[int]:
    """End offsets of the complete chunks of `text` (plus the tail when `final`).

    A chunk ends at the first sentence end (".", "!", "?" followed by whitespace, or a newline)
    at least `min_chars` after its start; failing one within `max_chars`, at the next whitespace;
    failing that within 2 * `max_chars`, hard at that length (long tokens, code, URLs). With
    `first_chars` (> 0), the first chunk ends at the first whitespace at least that far in
    (`_first_end`).
    """
    ends: list[int] = []
    start, n = 0, len(text)
    while True:
        if not ends and first_chars > 0:
            end = _first_end(text, first_chars, max_chars)
        else:
            end = _next_end(text, start, min_chars, max_chars)
        if end is None:
            break
        ends.append(end)
        start = end
    if final and start < n:
        ends.append(n)
    return ends


def _first_end(text: str, first_chars: int, max_chars: int) -> int | None:
    """The first chunk's end: the first whitespace at least `first_chars` in, so that it holds
    whole words; hard at the larger of `max_chars` and 2 * `first_chars` when there is none (code,
    a URL). It used to be hard at 2 * `first_chars`, which split the second word of most answers:
    "The primary colour is red." was checked as "The prim", which the classifier scored illicit
    0.68, and the answer was blocked before its first word was shown."""
    limit = max(max_chars, 2 * first_chars)
    for i in range(first_chars, min(limit, len(text))):
        if text[i].isspace():
            return i
    return limit if len(text) > limit else None


def _next_end(text: str, start: int, min_chars: int, max_chars: int) -> int | None:
    n = len(text)
    for i in range(start + min_chars, min(start + max_chars, n)):
        if text[i].isspace() and (text[i - 1] in SENTENCE_END or text[i] == "\n"):
            return i
    if n <= start + max_chars:
        return None
    for i in range(start + max_chars, min(start + 2 * max_chars, n)):
        if text[i].isspace():
            return i
    return start + 2 * max_chars if n > start + 2 * max_chars else None


def windows(text: str, ends: Sequence[int]) -> list[str]:
    """The text checked for each chunk: that chunk with the chunk before it."""
    out = []
    for k, end in enumerate(ends):
        begin = ends[k - 2] if k >= 2 else 0
        out.append(text[begin:end])
    return out


@dataclasses.dataclass
class CandidateCheck:
    """What output moderation decided about one candidate's cumulative text so far."""

    released: str  # text that passed, to send to the client (cumulative)
    blocked: common_pb2.ModerationResult | None  # the verdict that cut the answer, if any
    warned: common_pb2.ModerationResult | None  # the first WARN verdict among released chunks
    overall: common_pb2.ModerationResult | None  # max scores over checked chunks (for the audit)
    complete: bool  # every chunk checked: finished (or cut)


Verdicts = Callable[[list[str], list[str]], list[common_pb2.ModerationResult]]


def check_candidate(text: str, finished: bool, verdicts: Verdicts,
                    combine: Callable[[list[common_pb2.ModerationResult]], common_pb2.ModerationResult],
                    min_chars: int, max_chars: int, first_chars: int = 0, *, stream_first: bool = False,
                    hold: Callable[[common_pb2.ModerationResult], bool] | None = None) -> CandidateCheck:
    """Release the longest checked prefix of `text` (or, `stream_first`, all of it); cut at the
    first blocked chunk.

    `verdicts(windows, prefixes)` judges each chunk from its window (the chunk with the one
    before it) and its prefix (the whole answer up to the chunk's end: what a check for the
    hidden instructions reads, since a leak can be spread over chunks). With `stream_first`, a
    chunk whose verdict `hold` accepts makes the rest of the answer wait for its checks.
    """
    ends = chunk_ends(text, min_chars, max_chars, final=finished, first_chars=first_chars)
    results = verdicts(windows(text, ends), [text[:end] for end in ends]) if ends else []
    released_to, warned, holding = 0, None, not stream_first
    for k, (end, result) in enumerate(zip(ends, results, strict=True)):
        if result.action == BLOCK:
            return CandidateCheck(text[:released_to], result, warned, combine(results[:k + 1]), True)
        judged_again = k == 0 and first_chars > 0 and (len(ends) > 1 or not finished)
        if result.action == WARN and warned is None and not judged_again:
            warned = result
        released_to = end
        if not holding and hold is not None and hold(result):
            holding = True
    if not holding:
        released_to = len(text)
    return CandidateCheck(text[:released_to], None, warned, combine(results) if results else None,
                          finished)
