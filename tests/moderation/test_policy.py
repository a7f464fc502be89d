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
