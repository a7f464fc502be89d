"""One prompt template's single-turn answers: how many do not answer, and what it costs in facts.

Why: a template's wording moves a 135M model a long way ("(Answer this message directly and
briefly.)" makes it reply "The answer to this question is:" and stop on 14 of 428 questions), and
`bench.answer_copies` (45 prompts, turns 1 and 3, recall) is too small to see that. This asks
every question of ``rlhf/prompts.yaml`` (train, held-out, validation, anchor: 247) and every
single-turn question of the answer-quality gate (``model.quality_questions``: 181) once, as a
conversation's first turn assembled by the prompt service's own `Assembler`, answered by the
engine's scheduler on the served model at its manifest's defaults (greedy, repetition penalty,
copy guard), 64 tokens. Reports per template: stubs (an empty answer or one that ends on a colon:
a lead-in with nothing after it), non-answers (`rlhf.preference.non_answer`), the labelers' rule
mean on the 247 RLHF questions, the gate questions answered right (`model.quality.is_correct`), and
the answers output moderation cuts as its stage checks them (`bench.output_chunks.cuts`, the
product's chunking and policy: every question is benign, so each cut is a false positive), and those
it lets through with a warning, with how many of those warnings the policy shows the person
(`bench.output_chunks.warnings`, `output.warn_notices`).

    .venv/bin/python -m bench.template_answers --template v5
    .venv/bin/python -m bench.template_answers --label C --after "(Give a direct, brief answer.)"

Each run's figures and its failing answers (stubs, non-answers with the rule's reason, gate questions
answered wrong) go into ``bench/results/template_answers.json`` under its label (the version, unless
``--label``); a run under an existing label replaces it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from bench.answer_copies import Chats, echoes, shows_reminder
from bench.output_chunks import cuts, output_stage, warnings
from model.quality import is_correct
from model.quality_questions import QUESTIONS
from rlhf import preference
from services.prompt.config import DEFAULT_TEMPLATES
from services.prompt.templates import load_file

MAX_TOKENS = 64
RLHF_SETS = ("train", "heldout", "validation", "anchor")
GATE = tuple(q for q in QUESTIONS if not q.history)  # the gate's single-turn questions


def is_stub(answer: str) -> bool:
    """Nothing, or a lead-in that stops where its answer should start ("The answer is:")."""
    return not answer.strip() or answer.rstrip().endswith(":")


def rlhf_questions() -> list[str]:
    sets = yaml.safe_load(preference.PROMPTS_FILE.read_text(encoding="utf-8"))
    return [q if isinstance(q, str) else q["question"] for name in RLHF_SETS for q in sets[name]]


def summarize(rlhf_qs: list[str], rlhf_answers: list[str], quality_answers: list[str],
              reminder: str = "") -> dict[str, Any]:
    """The figures of one template's answers (quality answers in `QUESTIONS`' single-turn order);
    `reminder`: the template's hidden reminder after the message."""
    questions = [*rlhf_qs, *(q.prompt for q in GATE)]
    answers = [*rlhf_answers, *quality_answers]
    return {"answers": len(answers),
            "stubs": sum(is_stub(a) for a in answers),
            "echoes": sum(echoes(q, a, reminder) for q, a in zip(questions, answers, strict=True)),
            "showing_reminder": sum(shows_reminder(a, reminder) for a in answers),
            "non_answers": sum(preference.non_answer(q, a) is not None
                               for q, a in zip(questions, answers, strict=True)),
            "rule_mean_rlhf": round(sum(preference.score(q, a) for q, a in zip(rlhf_qs, rlhf_answers, strict=True))
                                    / len(rlhf_qs), 3),
            "quality_correct": sum(is_correct(a, q.accept) for q, a in zip(GATE, quality_answers, strict=True)),
            "quality_questions": len(GATE)}


def failures(rlhf_qs: list[str], answers: list[str]) -> list[dict[str, str]]:
    """The answers worth reading: each stub, non-answer (with why) and wrong gate answer."""
    out = []
    for i, (question, answer) in enumerate(zip([*rlhf_qs, *(q.prompt for q in GATE)], answers, strict=True)):
        why = [w for w in ("stub" if is_stub(answer) else "", preference.non_answer(question, answer) or "",
                           "" if i < len(rlhf_qs) or is_correct(answer, GATE[i - len(rlhf_qs)].accept)
                           else "gate: wrong") if w]
        if why:
            out.append({"question": question, "answer": answer, "why": ", ".join(why)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", default=DEFAULT_TEMPLATES, help="the prompt templates file")
    parser.add_argument("--template", default="", help="its version to start from (default: its current)")
    parser.add_argument("--before", default="", help="replace the version's system message")
    parser.add_argument("--after", default="", help="replace the version's reminder after the message")
    parser.add_argument("--label", default="", help="name of this run in the results (default: the version)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/template_answers.json"))
    args = parser.parse_args(argv)
    template = load_file(args.templates).get(args.template)
    template = dataclasses.replace(template, before=args.before or template.before,
                                   after=args.after or template.after)
    label = args.label or template.version
    chats = Chats.served(template)
    version = chats.model.version
    rlhf_qs = rlhf_questions()
    quality = [q.prompt for q in GATE]
    answers = chats.answer_all([chats.prompt([], q) for q in (*rlhf_qs, *quality)], MAX_TOKENS, None)
    figures = summarize(rlhf_qs, answers[:len(rlhf_qs)], answers[len(rlhf_qs):], template.after)
    stage = output_stage()
    pairs = list(zip([*rlhf_qs, *quality], answers, strict=True))
    cut, warned = cuts(stage, pairs), warnings(stage, pairs)
    print(f"{label}: {figures['stubs']} stubs, {figures['echoes']} echoes of the question, "
          f"{figures['showing_reminder']} showing the hidden reminder and {figures['non_answers']} non-answers "
          f"of {figures['answers']}; "
          f"rule mean {figures['rule_mean_rlhf']} on {len(rlhf_qs)} RLHF questions; "
          f"{figures['quality_correct']}/{figures['quality_questions']} gate questions right; "
          f"{len(cut)} cut by output moderation, {len(warned)} warned ({sum(w['shown'] for w in warned)} shown)")
    runs = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
    runs[label] = {"model": version, "template": dataclasses.asdict(template), "max_tokens": MAX_TOKENS,
                   **figures, "cut_by_output_moderation": len(cut),
                   "warned_by_output_moderation": len(warned),
                   "warnings_shown": sum(w["shown"] for w in warned),
                   "failures": failures(rlhf_qs, answers), "cut": cut, "warned": warned}
    args.out.write_text(json.dumps(runs, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
