"""Train the moderation heads: ``python -m services.moderation.train``.

Reads only the train split of data/policy.jsonl (and data/responses.jsonl for the compliance
head), embeds it with the same ONNX encoder and normalization the service uses, and fits one
logistic regression per category on [embedding, profanity score]. Each head is calibrated by
Platt scaling fitted on 5-fold out-of-fold decision values, and the calibration is folded into
the weights, so serving computes one sigmoid per category. Deterministic: same data, same
encoder build -> same file. Writes data/classifier.json (committed; regenerate after editing the
data) and prints cross-validated figures on the train split (never the held-out data).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold

from services.moderation import dataset, paths, rules
from services.moderation.categories import CATEGORIES
from services.moderation.embedder import Embedder
from services.moderation.policy import load as load_policy
from services.moderation.profanity import Profanity

C_GRID = (0.5, 1.0, 2.0, 4.0, 8.0)
FOLDS = 5
SEED = 0


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=10_000)
    return model.fit(x, y)


def _oof_decision(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """Out-of-fold decision values: what a head says about examples it was not trained on."""
    out = np.zeros(len(y))
    folds = StratifiedKFold(n_splits=min(FOLDS, int(y.sum())), shuffle=True, random_state=SEED)
    for train_idx, test_idx in folds.split(x, y):
        out[test_idx] = _fit(x[train_idx], y[train_idx], c).decision_function(x[test_idx])
    return out


def _platt(decision: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Sigmoid calibration a*d + b fitted on out-of-fold decisions (nearly unregularized)."""
    cal = LogisticRegression(C=1e4, max_iter=10_000).fit(decision.reshape(-1, 1), y)
    return float(cal.coef_[0, 0]), float(cal.intercept_[0])


def train_head(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float, np.ndarray]:
    """Calibrated weights, bias and the calibrated out-of-fold probabilities (for reporting)."""
    oof = _oof_decision(x, y, c)
    a, b = _platt(oof, y)
    model = _fit(x, y, c)
    w = a * model.coef_[0]
    bias = a * float(model.intercept_[0]) + b
    return w, bias, 1.0 / (1.0 + np.exp(-(a * oof + b)))


def choose_c(x: np.ndarray, ys: list[np.ndarray]) -> tuple[float, dict[str, float]]:
    """One regularization strength for all heads, by mean out-of-fold average precision."""
    results = {}
    for c in C_GRID:
        results[str(c)] = float(np.mean([average_precision_score(y, _oof_decision(x, y, c)) for y in ys]))
    best = max(C_GRID, key=lambda c: (round(results[str(c)], 4), -c))
    return best, results


def _prf(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": round(p, 3), "recall": round(r, 3),
            "f1": round(2 * p * r / (p + r) if p + r else 0.0, 3), "positives": int(y.sum())}


def _round(values: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


def train(out_path: Path, model_dir: Path | None = None) -> dict[str, Any]:
    started = time.time()
    examples = dataset.load(split="train")
    responses = dataset.responses()
    embedder = Embedder(model_dir)
    prof = Profanity()
    policy = load_policy(paths.POLICY_FILE)

    texts = [rules.normalize(e.text) for e in examples]
    x = np.hstack([embedder.embed(texts), prof.predict(texts).reshape(-1, 1)]).astype(np.float64)
    ys = [np.array([c in e.labels for e in examples], dtype=int) for c in CATEGORIES]
    c, grid = choose_c(x, ys)

    heads: dict[str, dict[str, Any]] = {}
    cv: dict[str, Any] = {}
    for name, y in zip(CATEGORIES, ys, strict=True):
        w, bias, oof = train_head(x, y, c)
        heads[name] = {"w": _round(w), "b": float(f"{bias:.6g}")}
        cv[name] = {**_prf(y, oof >= policy.categories[name].threshold),
                    "average_precision": round(float(average_precision_score(y, oof)), 3)}

    rx = embedder.embed([rules.normalize(t) for t, _ in responses]).astype(np.float64)
    ry = np.array([ok for _, ok in responses], dtype=int)
    cw, cb, coof = train_head(rx, ry, c)
    cv["compliance"] = _prf(ry, coof >= 0.5)

    doc = {
        "version": dataset.training_fingerprint()[:12],
        "embedder": embedder.model_id,
        "features": ["all-MiniLM-L6-v2 mean-pooled unit embedding (384)", "alt-profanity-check probability"],
        "training": {"fingerprint": dataset.training_fingerprint(), "examples": len(examples),
                     "responses": len(responses), "C": c, "C_grid_mean_average_precision": grid,
                     "folds": FOLDS, "class_weight": "balanced", "calibration": "platt on out-of-fold"},
        "cv_on_train_split": cv,
        "categories": heads,
        "compliance": {"w": _round(cw), "b": float(f"{cb:.6g}")},
    }
    out_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"trained {len(CATEGORIES)} heads + compliance on {len(examples)} examples "
          f"(C={c}) in {time.time() - started:.1f}s -> {out_path}")
    for name in [*CATEGORIES, "compliance"]:
        print(f"  cv {name:24s} {cv[name]}")
    return doc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=paths.CLASSIFIER_FILE)
    args = parser.parse_args(argv)
    train(args.out)


if __name__ == "__main__":
    main()
