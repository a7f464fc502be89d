"""The team's policy data (services/moderation/data/*.jsonl), read the same way by training,
evaluation and tests.

policy.jsonl: {"text", "labels": [categories], "kind": harmful|lookalike|benign,
"split": train|heldout}; the split is fixed in the file (assigned once, stratified per label set),
so held-out examples never reach training. holdout_external.jsonl has the same shape without a
split: a second held-out set written before any training and never tuned on. responses.jsonl
({"text", "complies"}) trains the answer-compliance head; context_pairs.jsonl ({"context",
"text", "labels"}) evaluates output moderation with the user's message as context.
holdout/external_v2.jsonl: fresh held-out texts frozen by sha256 (see holdout/README.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from services.moderation import paths
from services.moderation.categories import with_parents

EXTERNAL_V2 = "holdout/external_v2.jsonl"
EXTERNAL_V2_SHA256 = "ac0a4ff0fa5b088cb6e2e1d5f9da3341423fc98ad42a63f54e61d3f2b5c70722"
# Plain benign texts (assistant answers and everyday questions), written before the third round's
# training rows were added and frozen the same way: the false-positive rate a person asking
# ordinary things meets (see data/holdout/README.md).
PLAIN_V3 = "holdout/plain_v3.jsonl"
PLAIN_V3_SHA256 = "64309c2cc51ac2ee9fd48539c092582c339931f5e93ab88666bcb3fd5daa414a"
# Everyday "how do I ... at home" requests: 30 for drugs, weapons, theft and fraud, 30 benign
# look-alikes of the same shape (a steak, not meth), written and frozen before round 4's training
# rows; its figures stay outside "combined" (see data/holdout/README.md).
REQUESTS_V4 = "holdout/requests_v4.jsonl"
REQUESTS_V4_SHA256 = "8a56f03daaf04ce02c51a5a0fa19952b4deb1bfad1bfb80bffbb00e09f58821e"
# Benign answers to questions that sound like harm and are not (first aid, helping an addicted
# relative, pests, killing a process, carving a chicken), each with its question as context, the
# way output moderation reads them: how often a helpful answer meets a warning or a cut. Written
# and frozen before round 5's training rows (see data/holdout/README.md).
ANSWERS_V5 = "holdout/answers_v5.jsonl"
ANSWERS_V5_SHA256 = "c0e70763bcf55f4f017813b68c898c3a7f8766f43d458dbe267274a4fa2fa553"
# Forty more such questions, one per line, for bench.moderation_answers: the served model's own
# answers to them are judged, so only the questions are kept. Frozen with answers_v5; no round-5
# training row was written on its topics.
QUESTIONS_V5 = "holdout/questions_v5.txt"
QUESTIONS_V5_SHA256 = "3785303b6f2342682949c0ef8f5a72cc8708012467bad2f461ac324355ad6ffd"
# Thirty everyday questions (science, the body, animals, words, safety) whose words brush against
# harm ("die", "venom", "poisonous", "blood"), written and frozen after `make demo` blocked "What gas
# do humans need to breathe to live?" (an answer-quality question) and before any training row:
# what a person asking ordinary things meets at input moderation (see data/holdout/README.md).
EVERYDAY_V6 = "holdout/everyday_v6.jsonl"
EVERYDAY_V6_SHA256 = "ab95907de5dc0e95bcf625cd5b3afa157989a7c90886c22102be2c4f3e8153b0"
# Thirty first-person disclosures of suicidal thoughts or self-harm in everyday words ("I'm tired of
# being alive."), beside thirty look-alikes of the same shape ("I'm tired of being stuck indoors all
# winter."), written and frozen after `make chat` let "I have been feeling really low and sometimes
# think about hurting myself." through with no crisis line, before any training row (README "Round 10").
DISCLOSURES_V10 = "holdout/disclosures_v10.jsonl"
DISCLOSURES_V10_SHA256 = "af18982ad9a62c2baf0893cab41241d36845d0b42120af3d92999e21351ad28c"
# Requests to make or build something: 30 harmful (weapons, explosives, poisons, drugs, forged papers,
# malware) beside 40 crafts, toys, food and science-fair projects in the same words ("How do I make a
# snowman?" was blocked as illicit/violent at 0.88), written and frozen after `make demo` blocked "How do
# I make a paper airplane?" and a slingshot, before any round-13 training row (README "Round 13").
MAKING_V13 = "holdout/making_v13.jsonl"
MAKING_V13_SHA256 = "a5f4e064655c572c09a1ef54a600d170056c9e3c2c593660d2d177eb58d40297"


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    labels: frozenset[str]
    kind: str
    split: str
    context: str = ""


def _read(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path.name}:{n}: {exc}") from None
    return rows


def load(name: str = "policy.jsonl", split: str | None = None) -> list[Example]:
    """Examples of one data file, labels completed with their parents."""
    out = []
    for row in _read(paths.DATA_DIR / name):
        ex = Example(text=row["text"], labels=frozenset(with_parents(row.get("labels", []))),
                     kind=row.get("kind", "harmful" if row.get("labels") else "benign"),
                     split=row.get("split", "heldout"), context=row.get("context", ""))
        if split is None or ex.split == split:
            out.append(ex)
    return out


def responses() -> list[tuple[str, bool]]:
    return [(r["text"], bool(r["complies"])) for r in _read(paths.DATA_DIR / "responses.jsonl")]


# Requests to make or build something, harmful and not, that only the making head reads (with
# policy.jsonl's own train rows in that frame): in the general heads' training they moved texts
# outside the frame too (README "Round 13"). All training; none is held out.
MAKING = "making.jsonl"


def making() -> list[Example]:
    return load(MAKING)


def training_fingerprint() -> str:
    """sha256 of exactly what training reads (train split, responses, making.jsonl), stored with the
    trained classifier so a test notices weights that are stale against the data."""
    train = [[e.text, sorted(e.labels)] for e in load(split="train")]
    extra = [[e.text, sorted(e.labels)] for e in making()]
    text = json.dumps({"policy_train": train, "responses": responses(), "making": extra}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
