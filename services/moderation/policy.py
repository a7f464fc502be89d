"""The moderation policy from config (policy.yaml) and the verdict it makes from scores.

The verdict has the OpenAI moderation shape: flagged, categories, category_scores, plus the
strictest action over flagged categories and the policy version that decided.

A score that is not a finite number (NaN from a broken encoder run or weights) fails closed: the
category is flagged with score 1 and the verdict is BLOCK whatever the category's own action,
with an error log line and `colloquy_moderation_invalid_scores_total`. Clamping NaN would read
it as 0, i.e. allowed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import yaml
from colloquy.v1 import common_pb2

from services.moderation import metrics
from services.moderation.categories import CATEGORIES, SYSTEM_PROMPT_LEAK, family

log = logging.getLogger(__name__)

ALLOW = common_pb2.MODERATION_ACTION_ALLOW
WARN = common_pb2.MODERATION_ACTION_WARN
BLOCK = common_pb2.MODERATION_ACTION_BLOCK
ACTIONS = {"allow": ALLOW, "warn": WARN, "block": BLOCK}
_STRICTNESS = {common_pb2.MODERATION_ACTION_UNSPECIFIED: 0, ALLOW: 0, WARN: 1, BLOCK: 2}


class PolicyError(ValueError):
    """The policy file is invalid; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class CategoryPolicy:
    action: int
    threshold: float
    from_context: bool = False


@dataclasses.dataclass(frozen=True)
class LeakPolicy:
    """Output only: how much of a hidden instruction text an answer may reproduce (leak.py)."""

    action: int
    threshold: float
    ngram: int = 4
    min_ngrams: int = 6


HOLD = "hold"
STREAM_FIRST = "stream_first"
OUTPUT_MODES = (HOLD, STREAM_FIRST)
WARN_ALWAYS = "always"
WARN_ASKED = "asked"
WARN_NOTICES = (WARN_ALWAYS, WARN_ASKED)


@dataclasses.dataclass(frozen=True)
class OutputPolicy:
    """How output moderation releases answer text (see the README's "Hold or stream first").

    `hold`: text reaches the client only once its chunk is checked. `stream_first`: text is
    released as generated while the checker runs over it; a blocked chunk cuts the answer and the
    client is told to withdraw what it was shown past the cut. Under stream_first a turn is held
    and checked like `hold`, from the start, when the user's message scored a `hold_categories`
    category at `hold_at` x its threshold or more, and from the first checked chunk of the answer
    that does.

    `warn_notices`: whether an answer's warning (a WARN category: it never stops text) is shown
    to the person. `always`: every one. `asked`: only when the user's message scored a category
    of the same family at `asked_at` x its threshold or more; otherwise the warning is only
    recorded (the decision on moderation.decisions, the metrics). Every output warning on the
    served model's answers to 428 everyday questions was a false alarm ("Why do we need to drink
    water?" -> "This answer may contain self-harm" with a crisis line; README "Output warnings").
    """

    mode: str = HOLD
    hold_categories: tuple[str, ...] = ()
    hold_at: float = 0.5
    warn_notices: str = WARN_ALWAYS
    asked_at: float = 0.5


@dataclasses.dataclass(frozen=True)
class Policy:
    version: str
    categories: dict[str, CategoryPolicy]
    leak: LeakPolicy | None = None
    output: OutputPolicy = OutputPolicy()

    def threshold(self, name: str) -> float:
        """The flagging threshold of a category or of system_prompt_leak (1.0 when not configured)."""
        if name == SYSTEM_PROMPT_LEAK:
            return self.leak.threshold if self.leak is not None else 1.0
        return self.categories[name].threshold

    def suspects_hold(self, result: common_pb2.ModerationResult) -> bool:
        """True when `result` scores a hold category at hold_at x its threshold or more (stream_first)."""
        out = self.output
        return any(name in result.category_scores
                   and result.category_scores[name] >= out.hold_at * self.threshold(name)
                   for name in out.hold_categories)

    def shows_warning(self, warning: common_pb2.ModerationResult,
                      message: common_pb2.ModerationResult | None) -> bool:
        """Whether an answer's WARN verdict reaches the person (`output.warn_notices`), given the
        verdict on the user's message (None when the turn carries none: shown)."""
        out = self.output
        if out.warn_notices == WARN_ALWAYS or message is None:
            return True
        warned = {family(name) for name, hit in warning.categories.items() if hit}
        return any(family(name) in warned and score >= out.asked_at * self.threshold(name)
                   for name, score in message.category_scores.items() if name in self.categories)

    def decide(self, scores: dict[str, float]) -> common_pb2.ModerationResult:
        """Scores for every category -> verdict; unknown score names are ignored. The
        system_prompt_leak score is decided only when given (output moderation) and configured."""
        result = common_pb2.ModerationResult(policy_version=self.version, action=ALLOW)
        names: list[str] = list(CATEGORIES)
        rules: dict[str, CategoryPolicy] = dict(self.categories)
        if self.leak is not None and SYSTEM_PROMPT_LEAK in scores:
            names.append(SYSTEM_PROMPT_LEAK)
            rules[SYSTEM_PROMPT_LEAK] = CategoryPolicy(self.leak.action, self.leak.threshold)
        for name in names:
            raw = float(scores.get(name, 0.0))
            rule = rules[name]
            if math.isfinite(raw):
                score, action = min(1.0, max(0.0, raw)), rule.action
            else:
                log.error("moderation score is not a finite number; blocking the text",
                          extra={"category": name, "score": repr(raw)})
                metrics.INVALID_SCORES.labels(name).inc()
                score, action = 1.0, BLOCK
            hit = score >= rule.threshold
            result.category_scores[name] = score
            result.categories[name] = hit
            if hit:
                result.flagged = True
                if stricter(action, result.action):
                    result.action = action
        return result


def stricter(a: int, b: int) -> bool:
    """True when action `a` is stricter than `b` (BLOCK > WARN > ALLOW)."""
    return _STRICTNESS[a] > _STRICTNESS[b]


action_name = metrics.action_name


def parse(doc: object, source: str = "policy") -> Policy:
    if not isinstance(doc, dict):
        raise PolicyError(f"{source}: expected a mapping with 'version' and 'categories'")
    version = doc.get("version")
    if not isinstance(version, str) or not version.strip():
        raise PolicyError(f"{source}: 'version' must be a non-empty string")
    cats = doc.get("categories")
    if not isinstance(cats, dict):
        raise PolicyError(f"{source}: 'categories' must be a mapping")
    unknown = sorted(set(cats) - set(CATEGORIES))
    if unknown:
        raise PolicyError(f"{source}: unknown categories {unknown}")
    missing = [c for c in CATEGORIES if c not in cats]
    if missing:
        raise PolicyError(f"{source}: categories missing a policy: {missing}")
    out: dict[str, CategoryPolicy] = {}
    for name in CATEGORIES:
        entry = cats[name]
        where = f"{source}: categories.{name}"
        if not isinstance(entry, dict):
            raise PolicyError(f"{where}: expected a mapping with action and threshold")
        action, threshold = _action_and_threshold(entry, where)
        from_context = entry.get("from_context", False)
        if not isinstance(from_context, bool):
            raise PolicyError(f"{where}.from_context: expected true or false")
        out[name] = CategoryPolicy(action, threshold, from_context)
    return Policy(version=version.strip(), categories=out, leak=_parse_leak(doc, source),
                  output=_parse_output(doc, source))


def _parse_output(doc: dict, source: str) -> OutputPolicy:  # type: ignore[type-arg]
    """The optional `output` entry (release mode, warning notices); absent: hold-and-check, every
    warning shown."""
    entry = doc.get("output")
    if entry is None:
        return OutputPolicy()
    where = f"{source}: output"
    if not isinstance(entry, dict):
        raise PolicyError(f"{where}: expected a mapping with mode, hold_categories, hold_at, warn_notices, asked_at")
    unknown = sorted(set(entry) - {"mode", "hold_categories", "hold_at", "warn_notices", "asked_at"})
    if unknown:
        raise PolicyError(f"{where}: unknown keys {unknown}")
    mode = entry.get("mode", HOLD)
    if mode not in OUTPUT_MODES:
        raise PolicyError(f"{where}.mode: {mode!r} is not one of {', '.join(OUTPUT_MODES)}")
    cats = entry.get("hold_categories", [])
    known = (*CATEGORIES, SYSTEM_PROMPT_LEAK)
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        raise PolicyError(f"{where}.hold_categories: expected a list of category names")
    bad = sorted(set(cats) - set(known))
    if bad:
        raise PolicyError(f"{where}.hold_categories: unknown categories {bad}")
    factors = {}
    for key in ("hold_at", "asked_at"):
        value = entry.get(key, 0.5)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise PolicyError(f"{where}.{key}: {value!r} is not a number in (0, 1]")
        factors[key] = float(value)
    notices = entry.get("warn_notices", WARN_ALWAYS)
    if notices not in WARN_NOTICES:
        raise PolicyError(f"{where}.warn_notices: {notices!r} is not one of {', '.join(WARN_NOTICES)}")
    return OutputPolicy(mode, tuple(dict.fromkeys(cats)), factors["hold_at"], notices, factors["asked_at"])


def _parse_leak(doc: dict, source: str) -> LeakPolicy | None:  # type: ignore[type-arg]
    """The optional `system_prompt_leak` entry; absent: answers are not checked for it."""
    entry = doc.get(SYSTEM_PROMPT_LEAK)
    if entry is None:
        return None
    where = f"{source}: {SYSTEM_PROMPT_LEAK}"
    if not isinstance(entry, dict):
        raise PolicyError(f"{where}: expected a mapping with action, threshold, ngram, min_ngrams")
    unknown = sorted(set(entry) - {"action", "threshold", "ngram", "min_ngrams"})
    if unknown:
        raise PolicyError(f"{where}: unknown keys {unknown}")
    action, threshold = _action_and_threshold(entry, where)
    ints = {}
    for key, default in (("ngram", 4), ("min_ngrams", 6)):
        value = entry.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
            raise PolicyError(f"{where}.{key}: {value!r} is not a whole number in 1..64")
        ints[key] = value
    return LeakPolicy(action, threshold, **ints)


def _action_and_threshold(entry: dict, where: str) -> tuple[int, float]:  # type: ignore[type-arg]
    """A policy entry's `action` (block, warn, allow) and `threshold` in (0, 1], or PolicyError."""
    action = entry.get("action")
    if action not in ACTIONS:
        raise PolicyError(f"{where}.action: {action!r} is not one of block, warn, allow")
    threshold = entry.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        raise PolicyError(f"{where}.threshold: {threshold!r} is not a number in (0, 1]")
    return ACTIONS[action], float(threshold)


def load(path: Path | str) -> Policy:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: {exc}") from None
    return parse(doc, str(path))
