"""Moderation metrics (on the process's default registry, served at /metrics)."""

from __future__ import annotations

from collections.abc import Iterable

from colloquy.v1 import common_pb2
from prometheus_client import Counter, Histogram

from services.common.metrics import LATENCY_BUCKETS

DECISIONS = Counter(
    "colloquy_moderation_decisions_total",
    "Moderation verdicts by stage (api, input, output) and category; category \"none\" when nothing "
    "was flagged. One verdict flagging two categories counts once under each.",
    ["stage", "category", "action"])
LATENCY = Histogram(
    "colloquy_moderation_seconds", "Time to score one batch of texts, by stage", ["stage"],
    buckets=LATENCY_BUCKETS)
INVALID_SCORES = Counter(
    "colloquy_moderation_invalid_scores_total",
    "Scores that were not finite numbers (NaN/inf: a broken encoder run or weights), by category; "
    "each one blocked its text (policy.py fails closed)", ["category"])
TEXTS = Counter("colloquy_moderation_texts_total",
                "Texts scored, by stage and the action taken (the block-rate alert divides these)",
                ["stage", "action"])
# One per checked candidate answer (DECISIONS counts a verdict once per flagged category, so it is
# no denominator), by the model version that wrote the answer: a canary's output block rate
# against the stable version's (rlhf.canary). Versions only, so few series.
OUTPUT_VERDICTS = Counter("colloquy_moderation_output_verdicts_total",
                          "Output moderation verdicts, one per candidate answer, by the model version "
                          "that generated it and the action taken", ["model_version", "action"])

# One per candidate answer that passed with a warning: whether the person was shown it (policy.yaml
# `output.warn_notices`). A rising "false" share is the classifier warning on answers nobody asked
# anything of the kind about; DECISIONS{stage="output",action="warn"} has the categories.
OUTPUT_WARNINGS = Counter("colloquy_moderation_output_warnings_total",
                          "Answers that passed output moderation with a warning, by whether the "
                          "warning was shown to the person (output.warn_notices)", ["shown"])


def action_name(action: int) -> str:
    """The metric label of an action (policy.py imports this module, so the names live here)."""
    return {common_pb2.MODERATION_ACTION_WARN: "warn",
            common_pb2.MODERATION_ACTION_BLOCK: "block"}.get(action, "allow")


def count(stage: str, result: common_pb2.ModerationResult) -> None:
    """Count one verdict under every category it flagged, labelled with the action taken."""
    flagged = [name for name, hit in result.categories.items() if hit]
    if not flagged:
        DECISIONS.labels(stage, "none", "allow").inc()
        return
    for name in flagged:
        DECISIONS.labels(stage, name, action_name(result.action)).inc()


def count_output(model_version: str, result: common_pb2.ModerationResult) -> None:
    """Count one candidate answer's final output verdict under the version that wrote it."""
    count("output", result)
    OUTPUT_VERDICTS.labels(model_version or "unknown", action_name(result.action)).inc()


def observe(stage: str, seconds: float, texts: int,
            results: Iterable[common_pb2.ModerationResult] = ()) -> None:
    LATENCY.labels(stage).observe(seconds)
    seen = 0
    for r in results:
        seen += 1
        TEXTS.labels(stage, action_name(r.action) if r.flagged else "allow").inc()
        count(stage, r)
    if texts > seen:
        TEXTS.labels(stage, "allow").inc(texts - seen)
