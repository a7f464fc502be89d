"""Linear heads over sentence embeddings: one calibrated logistic regression per category, and
one that says whether an answer complies with its request (for context-aware output checks).

The trained coefficients live in data/classifier.json (written by `python -m
services.moderation.train`, a few dozen KB of numbers, committed so serving and evaluation need
no training step). A score is sigmoid(w . [embedding, profanity] + b), already calibrated (Platt
scaling folded into w and b).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from services.moderation.categories import CATEGORIES


class ClassifierError(RuntimeError):
    """The classifier file is missing or does not fit the categories/embedder."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40, 40)))


class Heads:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.meta = {k: v for k, v in doc.items() if k not in ("categories", "compliance")}
        cats = doc["categories"]
        if list(cats) != list(CATEGORIES):
            raise ClassifierError(f"classifier categories {list(cats)} differ from {list(CATEGORIES)}")
        self.w = np.array([cats[c]["w"] for c in CATEGORIES], dtype=np.float32)  # (13, 385)
        self.b = np.array([cats[c]["b"] for c in CATEGORIES], dtype=np.float32)
        self.comply_w = np.array(doc["compliance"]["w"], dtype=np.float32)  # (384,)
        self.comply_b = float(doc["compliance"]["b"])
        self.version = str(doc.get("version", "?"))

    @classmethod
    def load(cls, path: Path | str) -> Heads:
        path = Path(path)
        try:
            return cls(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ClassifierError(f"no classifier at {path}: run `python -m services.moderation.train`") from None
        except (ValueError, KeyError) as exc:
            raise ClassifierError(f"{path} is not a valid classifier file: {exc}") from None

    @staticmethod
    def features(embeddings: np.ndarray, profanity: np.ndarray) -> np.ndarray:
        return np.hstack([embeddings, profanity.reshape(-1, 1).astype(np.float32)])

    def scores(self, embeddings: np.ndarray, profanity: np.ndarray) -> np.ndarray:
        """(n, 13) calibrated probabilities in CATEGORIES order."""
        return _sigmoid(self.features(embeddings, profanity) @ self.w.T + self.b)

    def compliance(self, embeddings: np.ndarray) -> np.ndarray:
        """(n,) probability that each answer goes along with what was asked (vs declines/redirects)."""
        return _sigmoid(embeddings @ self.comply_w + self.comply_b)
