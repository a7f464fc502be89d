"""Do a model's greedy answers state the facts less often than the answers a round trains on?

``python -m rlhf.fact_drift --dataset DIR VERSION [VERSION ...]``: for each registry version, the
``correct`` term of the labellers' rule (:func:`rlhf.preference.correct`) on the training questions
of ``rlhf/prompts.yaml`` that the feedback in DIR holds rankings of from that version: its greedy
answers through the exported build, against every answer the labellers drew from it and against
the best-ranked one. Written for issue 21's round 2s, which lost facts on held-out questions
(bench/results/rlhf_rounds_real.md, 2026-12-06): the numbers tell whether the data itself was worse.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Iterable, Sequence
from typing import Any

from rlhf import preference
from rlhf.labelers import TRAINING_LISTS, train_questions


def training_question(prompt: str, questions: Sequence[str]) -> str | None:
    """The training question a served prompt's last user message asks (the template's reminder,
    after a blank line, and a missing question mark do not matter), or None."""
    by_key = {q.strip().rstrip("?").lower(): q for q in questions}
    user = preference.question_of(prompt).strip()
    return by_key.get(user.split("\n")[0].strip().rstrip("?").lower())


def sampled_correct(rows: Iterable[dict[str, Any]], questions: Sequence[str]
                    ) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """version -> question -> (``correct`` of every ranked answer, of each ranking's best)."""
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = collections.defaultdict(dict)
    for row in rows:
        question = training_question(row["prompt"], questions) if row.get("kind") == "ranking" else None
        if question is None or not row.get("ranking"):
            continue
        scores = [preference.correct(question, a) for a in row["answers"]]
        every, best = out[row["model_version"]].setdefault(question, ([], []))
        every += scores
        best.append(scores[row["ranking"][0]])
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> int:
    import pyarrow.dataset as pads

    from model.registry import Registry
    from rlhf.evaluation import served_prompts
    from rlhf.export import greedy_texts

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="the feedback dataset (FEEDBACK_DATASET_DIR)")
    p.add_argument("--registry", default=None, help="registry root (default: the job's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("versions", nargs="+")
    args = p.parse_args(argv)
    train = train_questions(lists=TRAINING_LISTS)
    rows = pads.dataset(args.dataset, format="parquet", partitioning="hive").to_table().to_pylist()
    sampled = sampled_correct(rows, train)
    registry = Registry(args.registry)
    print("| version | questions | greedy | all samples | best-ranked sample |\n|---|---|---|---|---|")
    for version in args.versions:
        asked = [q for q in train if q in sampled.get(version, {})]
        if not asked:
            print(f"| `{version}` | 0 | - | - | - |")
            continue
        prompts, _ = served_prompts(asked)
        greedy = greedy_texts(registry.version_path(version), prompts, args.max_new_tokens)
        g = _mean([preference.correct(q, a) for q, a in zip(asked, greedy, strict=True)])
        every = _mean([_mean(sampled[version][q][0]) for q in asked])
        best = _mean([_mean(sampled[version][q][1]) for q in asked])
        print(f"| `{version}` | {len(asked)} | {g:.3f} | {every:.3f} | {best:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
