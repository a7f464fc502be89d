"""Train the moderation heads: ``python -m services.moderation.train``.

Reads only the train split of data/policy.jsonl and data/responses.jsonl (assistant replies:
benign examples for every head, and the compliance head's labels), embeds them with the same
ONNX encoder and normalization the service uses, and fits the heads described in
`classifier.py`: logistic regressions (balanced class weights) whose Platt calibration is fitted
on 5-fold out-of-fold decision values and folded into the weights.
Deterministic: same data and encoder build -> same weights. Writes data/classifier.npz (weights)
and data/classifier.json (what they were trained on, and 5-fold cross-validated figures of the
whole scorer on the train split; the held-out data is for `bench.moderation_eval` only).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold

from services.moderation import dataset, paths, rules
from services.moderation.categories import CATEGORIES, family
from services.moderation.classifier import combine, features, sigmoid
from services.moderation.embedder import Embedder
from services.moderation.policy import load as load_policy
from services.moderation.profanity import Profanity

LAYERS = [1, 2, 3, 4, 5, 6]
C_GRID = (4.0, 8.0, 16.0, 32.0)
FOLDS = 5
SEED = 0


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    return LogisticRegression(C=c, class_weight="balanced", max_iter=10_000).fit(x, y)


def _folds(y: np.ndarray, seed: int = SEED) -> StratifiedKFold:
    return StratifiedKFold(n_splits=max(2, min(FOLDS, int(y.sum()), int(len(y) - y.sum()))),
                           shuffle=True, random_state=seed)


def _oof_decision(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """Out-of-fold decision values: what a head says about examples it was not trained on."""
    out = np.zeros(len(y))
    for tr, te in _folds(y).split(x, y):
        out[te] = _fit(x[tr], y[tr], c).decision_function(x[te])
    return out


def head(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """Calibrated weights and bias: sigmoid(a * (w.x + b0) + b) with a, b fitted out of fold."""
    oof = _oof_decision(x, y, c)
    cal = LogisticRegression(C=1e4, max_iter=10_000).fit(oof.reshape(-1, 1), y)
    a, b = float(cal.coef_[0, 0]), float(cal.intercept_[0])
    model = _fit(x, y, c)
    return (a * model.coef_[0]).astype(np.float32), a * float(model.intercept_[0]) + b


def fit_all(x: np.ndarray, labels: np.ndarray, c: float) -> dict[str, np.ndarray]:
    """Harm head on everything, category heads on the harmful examples only."""
    harm = labels.any(axis=1).astype(int)
    hw, hb = head(x, harm, c)
    xs, ls = x[harm == 1], labels[harm == 1]
    cat = [head(xs, ls[:, j].astype(int), c) for j in range(len(CATEGORIES))]
    return {"harm_w": hw, "harm_b": np.float32(hb), "cat_w": np.stack([w for w, _ in cat]),
            "cat_b": np.array([b for _, b in cat], dtype=np.float32)}


def predict(arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    harm = sigmoid(x @ arrays["harm_w"] + arrays["harm_b"])
    return combine(harm, sigmoid(x @ arrays["cat_w"].T + arrays["cat_b"]))


def choose_c(x: np.ndarray, harm: np.ndarray) -> tuple[float, dict[str, float]]:
    """Regularization strength by the harm head's out-of-fold average precision."""
    grid = {str(c): round(float(average_precision_score(harm, _oof_decision(x, harm, c))), 4) for c in C_GRID}
    return max(C_GRID, key=lambda c: (grid[str(c)], -c)), grid


def _prf(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": round(p, 3), "recall": round(r, 3),
            "f1": round(2 * p * r / (p + r) if p + r else 0.0, 3), "positives": int(y.sum())}


def cross_validate(x: np.ndarray, labels: np.ndarray, c: float, thresholds: np.ndarray) -> dict[str, Any]:
    """The whole scorer (rules aside), 5-fold out of fold on the train split."""
    harm = labels.any(axis=1)
    scores = np.zeros(labels.shape)
    for tr, te in _folds(harm.astype(int), seed=SEED + 1).split(x, harm):
        scores[te] = predict(fit_all(x[tr], labels[tr], c), x[te])
    hits = scores >= thresholds
    flagged = hits.any(axis=1)
    caught = np.where(flagged & harm)[0]
    fams = [{family(CATEGORIES[j]) for j in np.where(labels[i])[0]} for i in caught]
    top = [family(CATEGORIES[int(np.argmax(scores[i] / thresholds))]) for i in caught]
    return {
        "flagged": _prf(harm, flagged),
        "family_accuracy_among_flagged": round(float(np.mean([t in f for t, f in zip(top, fams, strict=True)])), 3),
        "categories": {name: _prf(labels[:, j].astype(bool), hits[:, j]) for j, name in enumerate(CATEGORIES)},
    }


def train(out_dir: Path, model_dir: Path | None = None, precision: str = "int8") -> dict[str, Any]:
    started = time.time()
    examples = dataset.load(split="train")
    responses = dataset.responses()
    embedder = Embedder(model_dir, precision=precision)
    prof = Profanity()
    policy = load_policy(paths.POLICY_FILE)

    def featurize(texts: list[str]) -> np.ndarray:
        norm = [rules.normalize(t) for t in texts]
        return features(embedder.embed(norm), prof.predict(norm), LAYERS).astype(np.float64)

    # Assistant-style replies (responses.jsonl) are benign texts too: output moderation reads
    # answers, and refusals or "Sure, here are the steps" alone must not look harmful.
    rx = featurize([t for t, _ in responses])
    ry = np.array([ok for _, ok in responses], dtype=int)
    x = np.vstack([featurize([e.text for e in examples]), rx])
    labels = np.array([[c in e.labels for c in CATEGORIES] for e in examples]
                      + [[False] * len(CATEGORIES)] * len(responses), dtype=bool)
    c, grid = choose_c(x, labels.any(axis=1).astype(int))
    arrays = fit_all(x, labels, c)
    cw, cb = head(rx, ry, c)
    thresholds = np.array([policy.categories[n].threshold for n in CATEGORIES])
    cv = cross_validate(x, labels, c, thresholds)
    comply_oof = sigmoid(_oof_decision(rx, ry, c))  # uncalibrated, only its sign matters here
    cv["compliance"] = _prf(ry.astype(bool), comply_oof >= 0.5)

    fingerprint = dataset.training_fingerprint()
    meta = {
        "version": fingerprint[:12], "categories": list(CATEGORIES), "embedder": embedder.model_id,
        "layers": LAYERS, "features": "L2-normalized mean embedding of each layer in `layers` + profanity",
        "training": {"fingerprint": fingerprint, "examples": len(examples), "responses": len(responses),
                     "C": c, "C_grid_harm_average_precision": grid, "folds": FOLDS,
                     "class_weight": "balanced", "calibration": "Platt on out-of-fold decisions",
                     "policy_version_for_cv": policy.version},
        "cv_on_train_split": cv,
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, layers=np.array(LAYERS, dtype=np.int32), comply_w=cw, comply_b=np.float32(cb),
                        meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    weights = buf.getvalue()
    (out_dir / "classifier.npz").write_bytes(weights)
    meta["npz_sha256"] = hashlib.sha256(weights).hexdigest()
    (out_dir / "classifier.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(f"trained harm + {len(CATEGORIES)} category heads + compliance on {len(examples)} examples "
          f"(C={c}) in {time.time() - started:.1f}s -> {out_dir / 'classifier.npz'}")
    print(f"  cv flagged {cv['flagged']}  family accuracy {cv['family_accuracy_among_flagged']}")
    for name in CATEGORIES:
        print(f"  cv {name:24s} {cv['categories'][name]}")
    print(f"  cv compliance {cv['compliance']}")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=paths.DATA_DIR)
    parser.add_argument("--precision", choices=["int8", "fp32"], default="int8",
                        help="encoder build to train on (the one the service will run)")
    args = parser.parse_args(argv)
    train(args.out_dir, precision=args.precision)


if __name__ == "__main__":
    main()
