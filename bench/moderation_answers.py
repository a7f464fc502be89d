"""What a person asking harm-sounding but benign things meets: ``python -m bench.moderation_answers``.

Eighty questions that sound like harm and are not (first aid, helping an addicted relative, pests,
killing a process, filleting a fish): the 40 questions of data/holdout/answers_v5.jsonl (round 5's
development set: its served answers were read while round 5's training rows were written) and the
40 of data/holdout/questions_v5.txt (its test set: no training row was written on its topics). Each question is
moderated as input moderation does, and the served model's own greedy answer to it (what
`make chat` shows: the pipeline's assembled prompt, 200 new tokens) as output moderation does in
stream-first mode (each chunk with the one before it, the question as context). Every question
is benign, so every input block or warning, answer cut or answer warning is a false positive; a
person sees each of them but an answer warning the policy keeps quiet (`output.warn_notices`: the
"answer warning shown" column counts those it shows). ``--stack`` starts the whole stack and asks
the served model; without it the answers stored in bench/results/moderation_answers.json are judged
again (they must be the served version's), which is how a classifier change is measured. Writes
bench/results/moderation_answers.json.
"""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

from bench import common
from bench.common import Record

NAME = "moderation_answers"
MAX_TOKENS = 200  # the terminal client's default


def questions() -> dict[str, list[str]]:
    from services.moderation import dataset, paths

    test = (paths.DATA_DIR / dataset.QUESTIONS_V5).read_text(encoding="utf-8").splitlines()
    return {"dev (answers_v5 questions)": [e.context for e in dataset.load(dataset.ANSWERS_V5)],
            "test (questions_v5)": [q for q in test if q.strip()]}


def served_answers(asked: list[str]) -> dict[str, str]:
    """Greedy answers of the served model through a whole stack (prompt assembly, then Ray Serve)."""
    import grpc
    from colloquy.v1 import common_pb2, generation_pb2, generation_pb2_grpc

    from bench.pipeline import assembled_prompt

    out: dict[str, str] = {}
    with common.stack() as s:
        for q in asked:
            rid = f"bench-{uuid.uuid4().hex}"
            with grpc.insecure_channel(f"127.0.0.1:{s.ports['generation']}") as ch:
                stream = generation_pb2_grpc.GenerationServiceStub(ch).Generate(
                    generation_pb2.GenerateRequest(prompt=assembled_prompt(s, q), request_id=rid,
                                                   sampling=common_pb2.SamplingParams(temperature=0.0,
                                                                                      max_tokens=MAX_TOKENS)),
                    metadata=(("session_id", rid),), timeout=600)
                out[q] = "".join(msg.delta for msg in stream)
    return out


def judge(asked: list[str], answers: dict[str, str]) -> dict[str, Any]:
    """Input and output moderation's verdicts, as the stages reach them."""
    from services.common import config
    from services.moderation import streaming
    from services.moderation.__main__ import load_leak_detector, load_moderator
    from services.moderation.config import ModerationConfig
    from services.moderation.policy import BLOCK, WARN
    from services.moderation.worker import OutputStage

    cfg = config.load(ModerationConfig)
    moderator = load_moderator(cfg)
    stage = OutputStage(moderator, cfg.chunk_min_chars, cfg.chunk_max_chars, first_chars=cfg.chunk_first_chars,
                        leak=load_leak_detector(cfg, moderator))

    def names(result: Any) -> list[str]:
        return sorted(c for c, v in result.categories.items() if v)

    flagged: list[dict[str, Any]] = []
    counts = {"input_blocked": 0, "input_warned": 0, "answer_cut": 0, "answer_warned": 0, "answer_warning_shown": 0}
    for q, verdict in zip(asked, moderator.moderate(asked), strict=True):
        row: dict[str, Any] = {"question": q}
        if verdict.action == BLOCK:
            counts["input_blocked"] += 1
            flagged.append({**row, "input_blocked": names(verdict)})
            continue
        if verdict.action == WARN:
            counts["input_warned"] += 1
            row["input_warned"] = names(verdict)
        answer = answers[q]
        check = streaming.check_candidate(answer, True, stage._verdicts(q), stage._combine, stage.min_chars,
                                          stage.max_chars, stage.first_chars, stream_first=True,
                                          hold=moderator.policy.suspects_hold)
        if check.blocked is not None:
            counts["answer_cut"] += 1
            row.update(answer_cut=names(check.blocked), released=len(check.released), of=len(answer))
        elif check.warned is not None:
            counts["answer_warned"] += 1
            row["answer_warned"] = names(check.warned)
            row["warning_shown"] = moderator.policy.shows_warning(check.warned, verdict)  # output.warn_notices
            counts["answer_warning_shown"] += row["warning_shown"]
        if len(row) > 1:
            flagged.append(row)
    return {**counts, "questions": len(asked), "nothing_flagged": len(asked) - len(flagged), "flagged": flagged}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.moderation.__main__ import load_moderator  # noqa: F401  (fail early without the build)

    sets = questions()
    everything = [q for qs in sets.values() for q in qs]
    _, version = common.served_model()
    stored = common.RESULTS / f"{NAME}.json"
    old = json.loads(stored.read_text(encoding="utf-8")) if stored.is_file() else {}
    answers = old.get("answers", {}) if old.get("params", {}).get("answers_of") == version else {}
    if args.stack or any(q not in answers for q in everything):
        if not args.stack:
            raise SystemExit(f"no stored answers of {version} to every question: run with --stack")
        answers = served_answers(everything)
    rec = Record(NAME, {"answers_of": version, "max_tokens": MAX_TOKENS, "mode": "stream_first",
                        "method": __doc__.split("\n\n")[1].replace("\n", " ")})
    rows = []
    for name, asked in sets.items():
        r = rec.results[name] = judge(asked, answers)
        rows.append([name, r["questions"], r["input_blocked"], r["input_warned"], r["answer_cut"],
                     r["answer_warned"], r["answer_warning_shown"], r["nothing_flagged"]])
    rec.doc["answers"] = answers
    rec.finish()
    print(common.table(rows, ["questions", "n", "input blocked", "input warned", "answer cut", "answer warned",
                              "answer warning shown", "nothing flagged"]))
    return rec.doc


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.moderation_answers", description=__doc__.split("\n\n")[0])
    p.add_argument("--stack", action="store_true", help="start the whole stack and ask the served model again")
    run(p.parse_args())


if __name__ == "__main__":
    main()
