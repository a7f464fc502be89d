"""The comparison dataset as the job reads it: a feedback window, comparisons, a held-out split.

Rows come from the feedback sink's Parquet files (``services.feedback.dataset``; directory
``FEEDBACK_DATASET_DIR`` as the sink is configured). A run takes only feedback created in
``[since, until)``: ``since`` is the window end recorded in the base version's manifest
(``training.feedback_window.until_ms``, written by the previous run that produced it; 0 for a
model that never went through RLHF) and ``until`` is the job's start time, so two runs never
train on the same feedback twice along a lineage, and feedback arriving during a run waits
for the next one.

Held-out comparisons are chosen by a hash of the prompt (not of the row), so all feedback on
one prompt sits on the same side and held-out accuracy measures generalisation to new prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.reward import ranking_pairs

SOURCES = ("simulated", "human", "all")
# Finish reasons of an answer whose text is a prefix: cut at max_tokens, or stopped by output
# moderation. The model did not end it there, so no trainer may put an end token after it.
CUT_FINISH_REASONS = frozenset({"length", "moderated"})


@dataclass(frozen=True)
class FeedbackWindow:
    """Feedback created at ``since_ms <= created_unix_ms < until_ms`` (Unix milliseconds)."""

    since_ms: int
    until_ms: int

    def as_dict(self) -> dict[str, int]:
        return {"since_ms": self.since_ms, "until_ms": self.until_ms}


@dataclass(frozen=True)
class Comparison:
    """One labelled prompt: its candidate answers and the ``(better, worse)`` pairs the label gives."""

    prompt: str
    answers: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]
    source: str
    feedback_ids: tuple[str, ...] = field(default=())
    # Per answer: did the model end it (finish reason "stop")? Empty: every answer ended (rows
    # written before finish reasons were recorded).
    ended: tuple[bool, ...] = field(default=())


@dataclass
class DatasetStats:
    """What was read and what was used, for the manifest and the job's log."""

    rows: int = 0
    rankings: int = 0
    ratings: int = 0
    ratings_paired: int = 0
    ratings_dropped: int = 0
    invalid: int = 0
    missing_prompt: int = 0
    pairs: int = 0
    tied_pairs: int = 0  # pairs of rankings' answers labelled as good as each other (not trained on)
    all_tied: int = 0  # rankings whose answers were all tied (no pairs)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def dataset_dir() -> Path:
    """Where the feedback sink writes (its own config, so both always agree)."""
    from services.common.config import load
    from services.feedback.config import FeedbackConfig

    return Path(load(FeedbackConfig).dataset_dir)


def window_since(manifest: Mapping[str, Any] | None) -> int:
    """The window end recorded by the run that produced a base version (0 if none did)."""
    training = (manifest or {}).get("training") or {}
    window = training.get("feedback_window") or {}
    return int(window.get("until_ms", 0))


def read_rows(root: Path, source: str, window: FeedbackWindow) -> list[dict[str, Any]]:
    """Deduplicated feedback rows of ``source`` (``simulated``, ``human`` or ``all``) in the window."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    from services.feedback import dataset

    table = dataset.read(root, None if source == "all" else source, window.since_ms, window.until_ms)
    return table.to_pylist()


def answers_ended(row: Mapping[str, Any]) -> tuple[bool, ...]:
    """Which of a feedback row's answers the model ended itself (see :data:`CUT_FINISH_REASONS`);
    empty when the row has no finish reason for each answer."""
    reasons = list(row.get("answer_finish_reasons") or ())
    if len(reasons) != len(row.get("answers") or ()):
        return ()
    return tuple(r not in CUT_FINISH_REASONS for r in reasons)


def comparisons(rows: Iterable[Mapping[str, Any]]) -> tuple[list[Comparison], DatasetStats]:
    """Turn feedback rows into comparisons; rankings give all their pairs but tied ones, ratings only
    up-vs-down pairs.

    Rows without a prompt are skipped and counted in ``missing_prompt``.

    Ratings are grouped by prompt: every up-rated answer beats every down-rated answer of the
    same prompt (identical texts are merged; an answer rated both ways is ambiguous and
    dropped). A prompt with only ups or only downs yields nothing and its ratings are counted
    in ``ratings_dropped``.
    """
    stats = DatasetStats()
    out: list[Comparison] = []
    rated: dict[str, dict[str, Any]] = {}
    for row in rows:
        stats.rows += 1
        if not (row.get("prompt") or "").strip():
            # A preference without the prompt it answers teaches the reward model nothing true.
            stats.missing_prompt += 1
            continue
        answers = tuple(row.get("answers") or ())
        if row.get("kind") == "ranking":
            ranking = list(row.get("ranking") or ())
            if len(ranking) < 2 or sorted(ranking) != sorted(set(ranking)) or not all(
                    0 <= i < len(answers) for i in ranking):
                stats.invalid += 1
                continue
            ties = list(row.get("ranking_tied_with_next") or ())
            if ties and len(ties) != len(ranking) - 1:
                stats.invalid += 1
                continue
            stats.rankings += 1
            pairs = tuple(ranking_pairs(ranking, ties))
            stats.tied_pairs += len(ranking) * (len(ranking) - 1) // 2 - len(pairs)
            if not pairs:  # every answer as good as the others: nothing to learn from
                stats.all_tied += 1
                continue
            out.append(Comparison(row["prompt"], answers, pairs, row["source"], (row["feedback_id"],),
                                  answers_ended(row)))
        elif row.get("kind") == "rating":
            index = row.get("rating_answer_index")
            if index is None or not 0 <= index < len(answers) or row.get("thumbs_up") is None:
                stats.invalid += 1
                continue
            stats.ratings += 1
            group = rated.setdefault(row["prompt"], {"votes": {}, "ids": [], "source": row["source"], "ended": {}})
            group["votes"].setdefault(answers[index], set()).add(bool(row["thumbs_up"]))
            ended = answers_ended(row)
            group["ended"].setdefault(answers[index], ended[index] if ended else True)
            group["ids"].append(row["feedback_id"])
        else:
            stats.invalid += 1
    for prompt, group in rated.items():
        ups = [a for a, v in group["votes"].items() if v == {True}]
        downs = [a for a, v in group["votes"].items() if v == {False}]
        if not ups or not downs:
            stats.ratings_dropped += len(group["ids"])
            continue
        stats.ratings_paired += len(group["ids"])
        answers = tuple(ups + downs)
        pairs = tuple((u, len(ups) + d) for u in range(len(ups)) for d in range(len(downs)))
        out.append(Comparison(prompt, answers, pairs, group["source"], tuple(group["ids"]),
                              tuple(group["ended"][a] for a in answers)))
    stats.pairs = sum(len(c.pairs) for c in out)
    return out, stats


def is_held_out(prompt: str, heldout_percent: int) -> bool:
    """Deterministic, prompt-level: the same prompt is on the same side in every run."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 100
    return bucket < heldout_percent


def split(items: Iterable[Comparison], heldout_percent: int) -> tuple[list[Comparison], list[Comparison]]:
    """``(train, held_out)`` by :func:`is_held_out` of each comparison's prompt."""
    train: list[Comparison] = []
    held: list[Comparison] = []
    for item in items:
        (held if is_held_out(item.prompt, heldout_percent) else train).append(item)
    return train, held


def prompts_of(items: Iterable[Comparison]) -> list[str]:
    """Distinct prompts in first-seen order (the PPO rollout prompts)."""
    return list(dict.fromkeys(c.prompt for c in items))
