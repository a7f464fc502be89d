"""The threshold search of `services.moderation.train` on made-up out-of-fold scores."""

from __future__ import annotations

import numpy as np

from services.moderation import train
from services.moderation.categories import CATEGORIES


def test_a_retrain_cannot_buy_precision_with_a_categorys_recall() -> None:
    """Benign texts that score high on one category tempt the search to raise its threshold;
    the recall it had at the previous policy's thresholds is a floor."""
    rng = np.random.default_rng(0)
    j = CATEGORIES.index("self-harm")
    harmful = np.zeros((40, len(CATEGORIES)), dtype=bool)
    harmful[:, j] = True
    scores_harmful = np.full((40, len(CATEGORIES)), 0.05)
    scores_harmful[:, j] = rng.uniform(0.36, 0.9, 40)  # half of them under 0.6
    benign = np.zeros((40, len(CATEGORIES)), dtype=bool)
    scores_benign = np.full((40, len(CATEGORIES)), 0.05)
    scores_benign[:, j] = rng.uniform(0.36, 0.6, 40)  # sleep tips and the like
    scores = np.vstack([scores_harmful, scores_benign])
    labels = np.vstack([harmful, benign])
    lookalike = np.zeros(len(labels), dtype=bool)
    start = np.full(len(CATEGORIES), 0.5)
    before = np.full(len(CATEGORIES), 0.35)

    free = train.choose_thresholds(scores, labels, lookalike, start)
    floors = train.recall_floors(scores, labels, before)
    held = train.choose_thresholds(scores, labels, lookalike, start, floors)

    def recall(t: np.ndarray) -> float:
        return float((scores_harmful[:, j] >= t[j]).mean())

    assert floors[j] == 1.0  # every harmful text was caught at 0.35
    assert recall(free) < 0.8  # unconstrained, precision wins
    assert recall(held) == 1.0


def test_a_retrain_cannot_buy_recall_with_a_categorys_false_positives() -> None:
    """Harmful texts that score low on one category tempt the search to lower its threshold;
    the benign texts it flagged at the previous policy's thresholds are a ceiling."""
    rng = np.random.default_rng(1)
    j = CATEGORIES.index("illicit")
    harmful = np.zeros((40, len(CATEGORIES)), dtype=bool)
    harmful[:, j] = True
    scores_harmful = np.full((40, len(CATEGORIES)), 0.05)
    scores_harmful[:, j] = rng.uniform(0.36, 0.9, 40)  # a third of them under 0.55
    benign = np.zeros((60, len(CATEGORIES)), dtype=bool)
    scores_benign = np.full((60, len(CATEGORIES)), 0.05)
    scores_benign[:6, j] = rng.uniform(0.36, 0.54, 6)  # "How do I make a paper airplane?" and the like
    scores = np.vstack([scores_harmful, scores_benign])
    labels = np.vstack([harmful, benign])
    lookalike = np.zeros(len(labels), dtype=bool)
    before = np.full(len(CATEGORIES), 0.55)

    free = train.choose_thresholds(scores, labels, lookalike, before)
    ceilings = train.false_positive_ceilings(scores, labels, before)
    held = train.choose_thresholds(scores, labels, lookalike, before, ceilings=ceilings)

    def benign_flagged(t: np.ndarray) -> int:
        return int((scores_benign[:, j] >= t[j]).sum())

    assert ceilings[j] == 0  # no benign text reached 0.55
    assert benign_flagged(free) > 0  # unconstrained, recall wins
    assert benign_flagged(held) == 0
