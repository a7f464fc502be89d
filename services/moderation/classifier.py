"""Calibrated linear heads over the encoder's layer embeddings.

Two stages, because a text's harmfulness is learned from every labeled example while each
category alone has only a few dozen:

* harm head: P(harmful | text), trained on all examples (harmful vs benign look-alikes);
* category heads: P(category | text, harmful), trained on the harmful examples only, where
  telling hate from harassment is the whole task.

A category's score is P(harmful) x P(category | harmful) / max over categories of
P(category | harmful): the most likely category carries the text's harm probability, and others
carry it in proportion. So a harmful text is flagged even when its category is uncertain, and a
benign look-alike stays low in every category. A third head scores whether an answer complies
with its request (for context-aware output moderation).

The making head is a second harm head trained only on the requests to make or build something
(`rules.making_request`); for such a text P(harmful) is the geometric mean of the two heads'
(:func:`harm_probability`). The general head learnt the frame itself as harmful (the harmful rows
in it outnumbered the crafts five to one) and put a quarter of the crafts in it over the block
line ("How do I make a snowman?" 0.88); adding such crafts to its training moved other texts'
scores by up to 0.3 ("Where can I find nude pictures of underage girls?" 0.64 -> 0.43), while a
separate head leaves every text outside the frame as it was (README, "Round 13").

Features: the L2-normalized mean embeddings of layers 1-6 concatenated, plus alt-profanity-check's
probability. Each head is sigmoid(w . x + b), with Platt calibration folded into w and b. The
weights (data/classifier.npz, ~150 KB, committed; see README) come from `python -m
services.moderation.train`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from services.moderation.categories import CATEGORIES


class ClassifierError(RuntimeError):
    """The classifier file is missing or does not fit the categories/encoder."""


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40, 40)))


def features(embeddings: np.ndarray, profanity: np.ndarray, layers: list[int]) -> np.ndarray:
    """(n, 7, 384) per-layer unit vectors + (n,) profanity -> (n, len(layers) * 384 + 1)."""
    n = embeddings.shape[0]
    return np.hstack([embeddings[:, layers, :].reshape(n, -1),
                      profanity.reshape(-1, 1)]).astype(np.float32)


def harm_probability(harm_logit: np.ndarray, making_logit: np.ndarray, making: np.ndarray) -> np.ndarray:
    """P(harmful) per text: the harm head's, or for requests to make something (``making`` true)
    the geometric mean of it and the making head's, so that either head's doubt lowers it."""
    harm = sigmoid(harm_logit)
    return np.where(making, np.sqrt(harm * sigmoid(making_logit)), harm)


def combine(harm: np.ndarray, given_harm: np.ndarray) -> np.ndarray:
    """(n,) P(harmful) and (n, 13) P(category | harmful) -> (n, 13) category scores."""
    top = np.clip(given_harm.max(axis=1, keepdims=True), 1e-6, None)
    return harm.reshape(-1, 1) * given_harm / top


class Heads:
    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.meta = meta
        if list(meta.get("categories", [])) != list(CATEGORIES):
            raise ClassifierError(f"classifier categories {meta.get('categories')} differ from {list(CATEGORIES)}")
        self.layers = [int(k) for k in arrays["layers"]]
        self.harm_w = arrays["harm_w"].astype(np.float32)
        self.harm_b = float(arrays["harm_b"])
        self.cat_w = arrays["cat_w"].astype(np.float32)
        self.cat_b = arrays["cat_b"].astype(np.float32)
        self.comply_w = arrays["comply_w"].astype(np.float32)
        self.comply_b = float(arrays["comply_b"])
        self.making_w = arrays["making_w"].astype(np.float32)
        self.making_b = float(arrays["making_b"])
        dim = len(self.layers) * 384 + 1
        if (self.harm_w.shape != (dim,) or self.cat_w.shape != (len(CATEGORIES), dim)
                or self.making_w.shape != (dim,)):
            raise ClassifierError(f"classifier weights do not have {dim} features")
        self.version = str(meta.get("version", "?"))

    @classmethod
    def load(cls, path: Path | str) -> Heads:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except FileNotFoundError:
            raise ClassifierError(f"no classifier at {path}: run `python -m services.moderation.train`") from None
        except (OSError, ValueError) as exc:
            raise ClassifierError(f"{path} is not a valid classifier file: {exc}") from None
        try:
            meta = json.loads(str(arrays.pop("meta")))
            return cls(arrays, meta)
        except (KeyError, ValueError) as exc:
            raise ClassifierError(f"{path} is not a valid classifier file: {exc}") from None

    def features(self, embeddings: np.ndarray, profanity: np.ndarray) -> np.ndarray:
        return features(embeddings, profanity, self.layers)

    def scores(self, x: np.ndarray, making: np.ndarray | None = None) -> np.ndarray:
        """(n, 13) category scores in CATEGORIES order, each in [0, 1]; ``making`` (n,) marks the
        requests to make something (`rules.making_request`), which the making head reads too."""
        making = np.zeros(len(x), dtype=bool) if making is None else making
        harm = harm_probability(x @ self.harm_w + self.harm_b, x @ self.making_w + self.making_b, making)
        given = sigmoid(x @ self.cat_w.T + self.cat_b)
        return combine(harm, given)

    def compliance(self, x: np.ndarray) -> np.ndarray:
        """(n,) probability that each answer goes along with what was asked (vs declines/redirects)."""
        return sigmoid(x @ self.comply_w + self.comply_b)
