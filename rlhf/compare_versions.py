"""Judge published versions on a question list: ``python -m rlhf.compare_versions V0 V1 V2 [--questions KEY]``.

Each version after the first is judged against the one before it (a round's child against its parent) and
against the first (the base), as the job judges a round (:func:`rlhf.job.evaluate`: greedy answers of the
exported builds in the served prompt layout, the labellers' rule), but on any list of ``rlhf/prompts.yaml``:
``heldout_wide`` by default, the 142 questions written after the round-2 children of 2026-12-07 existed, so
that children already judged on the 48 ``heldout`` questions can be judged again where one question does not
decide the verdict. Each version answers once (the answers are cached between pairs). Prints a line per pair
and writes the figures as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

from model.paths import registry_root
from model.registry import Registry
from rlhf import validation
from rlhf.job import evaluate
from rlhf.report import at_best_line


def pairs(versions: list[str]) -> list[tuple[str, str]]:
    """(parent, child) for each version after the first, then (first, child) where the parent is not the first."""
    chain = list(itertools.pairwise(versions))
    return chain + [(versions[0], v) for v in versions[2:]]


def line(parent: str, child: str, result: dict[str, Any]) -> str:
    wins, ties, losses = result["child_wins"], result["ties"], result["child_losses"]
    return (f"{child[-30:]} vs {parent[-30:]}: {wins}/{ties}/{losses} of {result['prompts']} "
            f"(win rate {result['child_win_rate']:.2f}), rule score {result['parent_score_mean']:.3f} -> "
            f"{result['child_score_mean']:.3f}; {at_best_line(result)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="registry versions, the base first, each the next one's parent")
    parser.add_argument("--questions", default="heldout_wide", help="a list of rlhf/prompts.yaml")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if len(args.versions) < 2:
        parser.error("name at least two versions")
    questions = validation.questions(key=args.questions)
    if not questions:
        parser.error(f"rlhf/prompts.yaml has no questions under {args.questions!r}")
    registry = Registry(registry_root())
    cache: dict[str, list[str]] = {}
    results = []
    for parent, child in pairs(args.versions):
        result = evaluate(registry.version_path(parent), registry.version_path(child), questions,
                          args.max_new_tokens, cache=cache)
        print(line(parent, child, result), flush=True)
        results.append({"parent": parent, "child": child, **result})
    if args.out:
        args.out.write_text(json.dumps({"questions": args.questions, "results": results}, indent=1) + "\n",
                            encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
