"""The policy file and the verdict it makes."""

from __future__ import annotations

import copy

import pytest
import yaml

from services.moderation import paths
from services.moderation.categories import CATEGORIES, consistent, with_parents
from services.moderation.policy import ALLOW, BLOCK, WARN, PolicyError, load, parse

DOC = yaml.safe_load(paths.POLICY_FILE.read_text())


def test_repo_policy_covers_every_category_with_a_version() -> None:
    policy = load(paths.POLICY_FILE)
    assert policy.version
    assert set(policy.categories) == set(CATEGORIES)


def test_verdict_has_the_openai_shape_and_the_strictest_action() -> None:
    policy = load(paths.POLICY_FILE)
    scores = dict.fromkeys(CATEGORIES, 0.01)
    quiet = policy.decide(scores)
    assert not quiet.flagged and quiet.action == ALLOW
    assert set(quiet.categories) == set(CATEGORIES) == set(quiet.category_scores)
    assert quiet.policy_version == policy.version

    warn = policy.decide({**scores, "harassment": 0.8})
    assert warn.flagged and warn.categories["harassment"] and warn.action == WARN
    both = policy.decide({**scores, "harassment": 0.8, "illicit": 0.9})
    assert both.action == BLOCK and both.categories["illicit"]
    assert both.category_scores["illicit"] == pytest.approx(0.9)


def test_threshold_is_inclusive_and_scores_are_clamped() -> None:
    policy = load(paths.POLICY_FILE)
    t = policy.categories["hate"].threshold
    assert policy.decide({"hate": t}).categories["hate"]
    assert policy.decide({"hate": 7.0}).category_scores["hate"] == 1.0


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.pop("version"), "version"),
    (lambda d: d["categories"].pop("hate"), "missing"),
    (lambda d: d["categories"].__setitem__("spam", {"action": "block", "threshold": 0.5}), "unknown"),
    (lambda d: d["categories"]["hate"].__setitem__("action", "delete"), "categories.hate.action"),
    (lambda d: d["categories"]["hate"].__setitem__("threshold", 1.5), "categories.hate.threshold"),
    (lambda d: d["categories"]["hate"].__setitem__("threshold", 0), "categories.hate.threshold"),
    (lambda d: d["categories"]["hate"].__setitem__("from_context", "yes"), "from_context"),
])
def test_invalid_policies_are_rejected_naming_the_key(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    doc = copy.deepcopy(DOC)
    mutate(doc)
    with pytest.raises(PolicyError, match=message):
        parse(doc, "policy.yaml")


def test_subcategories_imply_their_parents() -> None:
    assert with_parents(["hate/threatening"]) == {"hate", "hate/threatening"}
    with pytest.raises(ValueError, match="unknown"):
        with_parents(["hateful"])
    scores = consistent({**dict.fromkeys(CATEGORIES, 0.0), "self-harm/intent": 0.7})
    assert scores["self-harm"] == 0.7


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_score_fails_closed_with_a_block_a_log_line_and_a_metric(
        bad: float, caplog: pytest.LogCaptureFixture) -> None:
    """A NaN/inf score (a broken encoder run or weights) must not read as 0 = allowed: the
    category is flagged with score 1 and the verdict is BLOCK, even for a warn category."""
    from prometheus_client import REGISTRY

    def counted() -> float:
        return REGISTRY.get_sample_value("colloquy_moderation_invalid_scores_total",
                                         {"category": "harassment"}) or 0.0

    policy = load(paths.POLICY_FILE)
    assert policy.categories["harassment"].action == WARN  # fail closed means stricter than its action
    before = counted()
    with caplog.at_level("ERROR", logger="services.moderation.policy"):
        result = policy.decide({**dict.fromkeys(CATEGORIES, 0.01), "harassment": bad})
    assert result.flagged and result.categories["harassment"]
    assert result.category_scores["harassment"] == 1.0
    assert result.action == BLOCK
    assert any("not a finite number" in r.getMessage() for r in caplog.records)
    assert counted() == before + 1


def test_non_finite_context_score_is_not_dropped_by_the_answer_rule(moderator) -> None:  # type: ignore[no-untyped-def]
    """score(message) x compliance raised with max() would drop a NaN and keep the answer's own
    low score; the NaN must reach the policy, which blocks."""
    quiet = dict.fromkeys(CATEGORIES, 0.01)
    raised = moderator.with_context(quiet, {**quiet, "illicit": float("nan")}, 0.9)
    assert moderator.policy.decide(raised).action == BLOCK
    raised = moderator.with_context(quiet, quiet, float("nan"))
    assert moderator.policy.decide(raised).action == BLOCK


def test_output_mode_parses_with_hold_categories_and_bad_entries_are_named() -> None:
    from services.moderation.policy import HOLD, STREAM_FIRST

    shipped = load(paths.POLICY_FILE).output
    assert shipped.mode == HOLD and "sexual/minors" in shipped.hold_categories
    doc = copy.deepcopy(DOC)
    doc["output"] = {"mode": "stream_first", "hold_categories": ["sexual/minors"], "hold_at": 0.4}
    policy = parse(doc)
    assert policy.output.mode == STREAM_FIRST and policy.output.hold_at == 0.4
    t = policy.categories["sexual/minors"].threshold
    # just over hold_at x threshold: the verdict keeps scores as float32, which can round the
    # product itself to just under it (0.4 x 0.4)
    low, high = dict.fromkeys(CATEGORIES, 0.0), {**dict.fromkeys(CATEGORIES, 0.0), "sexual/minors": 0.4 * t + 1e-6}
    assert not policy.suspects_hold(policy.decide(low)) and policy.suspects_hold(policy.decide(high))
    del doc["output"]
    assert parse(doc).output.mode == HOLD  # absent: hold
    for bad, where in (({"mode": "fast"}, "output.mode"), ({"hold_categories": ["nope"]}, "hold_categories"),
                       ({"hold_at": 0}, "output.hold_at"), ({"extra": 1}, "unknown keys")):
        doc["output"] = bad
        with pytest.raises(PolicyError, match=where):
            parse(doc)


def test_an_answers_warning_is_shown_when_asked_for_by_the_users_message() -> None:
    """`warn_notices: asked`: a warning on an answer reaches the person only when their message
    scored the same family at `asked_at` x its threshold; `always` shows every one."""
    from services.moderation.policy import WARN_ALWAYS, WARN_ASKED

    assert load(paths.POLICY_FILE).output.warn_notices == WARN_ASKED  # shipped
    doc = copy.deepcopy(DOC)
    doc["output"] = {"mode": "hold", "warn_notices": "asked", "asked_at": 0.5}
    policy = parse(doc)
    t = policy.categories["self-harm/intent"].threshold
    warning = policy.decide({**dict.fromkeys(CATEGORIES, 0.0), "self-harm": 0.9})
    assert warning.action == WARN
    plain = policy.decide(dict.fromkeys(CATEGORIES, 0.0))
    low = policy.decide({**dict.fromkeys(CATEGORIES, 0.0), "self-harm/intent": 0.4 * t})
    same_family = policy.decide({**dict.fromkeys(CATEGORIES, 0.0), "self-harm/intent": 0.5 * t + 1e-6})
    other_family = policy.decide({**dict.fromkeys(CATEGORIES, 0.0), "violence": 0.99})
    assert not policy.shows_warning(warning, plain)
    assert not policy.shows_warning(warning, low)
    assert policy.shows_warning(warning, same_family)
    assert not policy.shows_warning(warning, other_family)
    assert policy.shows_warning(warning, None)  # a turn without input moderation: shown
    doc["output"]["warn_notices"] = WARN_ALWAYS
    assert parse(doc).shows_warning(warning, plain)
    del doc["output"]
    assert parse(doc).output.warn_notices == WARN_ALWAYS  # absent: as before the option
    for bad, where in (({"warn_notices": "never"}, "output.warn_notices"), ({"asked_at": 2}, "output.asked_at")):
        doc["output"] = bad
        with pytest.raises(PolicyError, match=where):
            parse(doc)
