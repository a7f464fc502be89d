"""The copy guard on and off: how much of earlier answers later answers copy, and what it costs.

In-process, no stack: prompts are assembled by the prompt service's own `Assembler` with the
served template and the real tokenizer, and answered by the engine's own scheduler
(`services.generation.scheduler`, batched, prefix cache on) on the served model (the registry's
current `generation` version) at its manifest's sampling defaults; the only difference between
the two runs is the request's `copy_penalty` (0 = off, or the model's default).

(a) copies: conversations of follow-ups ("Thanks!", "Another one?", "Tell me more.") where a
small model tends to repeat itself; for every answer after the first, the longest run of tokens
it shares with an earlier answer of its conversation (as the prompt held them).
(b) what it must not cost: every prompt of model.answer_quality asked as turn 1 (the guard has
nothing to copy there: equal by construction) and as turn 3 after two fixed
earlier turns (judged by answer_quality.judge: keyword hits and loops), and the recall
conversations of bench.prompt_history_reminder (a fact, then the question at turn 2; the fact,
two unrelated turns, the question at turn 4).
(c) after a stub: the same 45 prompts asked right after a first turn answered with a lead-in that
stops ("The answer to this question is:", fixed in the history): keyword hits, and how many answers
are the stub again (a whole short answer copied and ended where it ended).

    .venv/bin/python -m bench.answer_copies [--out bench/results/answer_copies.json]
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench import common
from bench.prompt_history_reminder import EARLIER, FILLER, RECALL
from model.answer_quality import MAX_TOKENS, PROMPTS, judge, keyword_hit
from services.generation.config import EngineSettings
from services.generation.repeats import earlier_answers
from services.generation.runner import LoadedModel
from services.generation.scheduler import Job, Scheduler
from services.generation.schema import Request, Sampling
from services.prompt.config import DEFAULT_TEMPLATES
from services.prompt.domain import Assembler, PastTurn
from services.prompt.templates import PromptTemplate, load_file
from services.tokenizer.domain import TextTokenizer

COPY_TOKENS = 64  # answers of the follow-up conversations: room for a sentence or two to copy
LONG_COPY = 8  # a shared run this long is a copied phrase, not shared words
# A stub the served model gives as a first answer (bench/results/template_answers.md), fixed in the history
# so the figure does not depend on the model producing it: are the next turns copies of it?
STUB_TURN = ("Why do we need sleep?", "The answer to this question is:")
# An answer that narrates the conversation ("The user asked for a tip ...") instead of answering.
NARRATES = re.compile(r"\bthe user\b", re.IGNORECASE)
FOLLOW_UPS: tuple[tuple[str, ...], ...] = (
    ("I just adopted a puppy!", "Thanks! Any tips for the first week?", "Thank you so much!",
     "What should I feed him?"),
    ("Bonjour ! Comment ça va ?", "Peux-tu m'aider à apprendre le français ?", "Merci !",
     "Un autre mot, s'il te plaît."),
    ("Give me a tip for sleeping better.", "Another one?", "And another?", "Thanks!"),
    ("Tell me a joke.", "Another one!", "One more?", "Haha, thanks."),
    ("I'm feeling a bit stressed today.", "Thanks, that helps.", "What else can I do?", "Thank you!"),
    ("What is a healthy breakfast?", "Tell me more.", "Any other ideas?", "Great, thanks!"),
    ("I want to start running.", "How often should I run?", "Thanks!", "What shoes should I buy?"),
    ("Can you recommend a book?", "Another one?", "Thanks! And a film?", "Thank you."),
    ("Hello!", "How are you today?", "What can you do?", "Thanks, bye!"),
    ("I have a job interview tomorrow.", "Thanks! What should I wear?", "Any other advice?", "Thank you so much!"),
    ("How do I make tea?", "Tell me more.", "What about green tea?", "Thanks!"),
    ("My plant's leaves are turning yellow.", "Thanks. How often should I water it?", "Anything else?", "Thank you!"),
)


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def echoes(message: str, answer: str, reminder: str) -> bool:
    """The answer opens by repeating the user's message: all of it when it is shorter than four words
    (and nothing else follows but the hidden `reminder`), else its first four words."""
    said, got = _words(message), _words(answer.replace(reminder, "")) if reminder else _words(answer)
    if len(said) < 4:
        return bool(said) and got == said
    return got[:4] == said[:4]


def shows_reminder(answer: str, reminder: str) -> bool:
    """The answer holds the start of the hidden reminder (its first two words: the model rewords the rest)."""
    opening = " ".join(reminder.split()[:2]).lower()
    return bool(opening) and opening in answer.lower()


def longest_shared_run(answer: list[int], earlier: list[list[int]]) -> int:
    """The longest run of consecutive tokens of `answer` found in one of `earlier`."""
    best = 0
    for other in earlier:
        prev = [0] * (len(other) + 1)
        for a in answer:
            cur = [0] * (len(other) + 1)
            for j, b in enumerate(other, 1):
                if a == b:
                    cur[j] = prev[j - 1] + 1
                    best = max(best, cur[j])
            prev = cur
    return best


class Chats:
    """Turns answered by one scheduler in batches: every conversation's next turn at once."""

    def __init__(self, model: LoadedModel, tok: TextTokenizer, template: PromptTemplate) -> None:
        self.model, self.tok, self.template = model, tok, template
        self.assembler = Assembler(tok, model.context_length)
        self.sched = Scheduler(model, EngineSettings(max_running=16, max_waiting=4096), threading.Lock())

    @classmethod
    def served(cls, template: PromptTemplate, model_dir: Path | None = None) -> Chats:
        """Chats on `model_dir` (default: the model the pipeline serves) with `template`."""
        model_dir, version = (model_dir, model_dir.name) if model_dir else common.served_model()
        model = LoadedModel(model_dir, version, "cpu")
        return cls(model, TextTokenizer.from_file(str(model_dir / "tokenizer.json")), template)

    def answer_all(self, prompts: list[str], max_tokens: int, copy_penalty: float | None) -> list[str]:
        # The template's answer stops, as the prompt stage sends them with every turn.
        sampling = Sampling(max_tokens=max_tokens, copy_penalty=copy_penalty, stop=self.template.answer_stops)
        jobs = [Job(Request(f"copies-{uuid.uuid4().hex}", p, sampling), self.model, self.model.encode(p))
                for p in prompts]
        self.sched.waiting.extend(jobs)
        while not all(c.finish is not None for j in jobs for c in j.cands):
            self.sched.step()
        # Text a stop string might have begun is held until the end; the engine adds it then (`_collect`).
        return [j.cands[0].text + j.cands[0].stops.flush() for j in jobs]

    def prompt(self, past: list[PastTurn], message: str) -> str:
        return self.assembler.assemble(self.template, past, message).prompt

    def conversations(self, convs: list[tuple[str, ...]], max_tokens: int,
                      copy_penalty: float | None) -> list[list[tuple[str, str]]]:
        """Each conversation's (prompt, answer) per turn, the turns of all conversations batched."""
        out: list[list[tuple[str, str]]] = [[] for _ in convs]
        for k in range(max(len(c) for c in convs)):
            live = [i for i, c in enumerate(convs) if k < len(c)]
            prompts = [self.prompt([PastTurn(t + 1, convs[i][t], out[i][t][1]) for t in range(k)], convs[i][k])
                       for i in live]
            for i, p, a in zip(live, prompts, self.answer_all(prompts, max_tokens, copy_penalty), strict=True):
                out[i].append((p, a))
        return out


def evaluate(chats: Chats, copy_penalty: float | None) -> dict[str, Any]:
    start = time.perf_counter()
    model = chats.model
    rows, runs = [], []
    answered = chats.conversations(list(FOLLOW_UPS), COPY_TOKENS, copy_penalty)
    for conv, turns in zip(FOLLOW_UPS, answered, strict=True):
        for k, (prompt, answer) in enumerate(turns):
            if k == 0:
                continue
            earlier = earlier_answers(model.encode(prompt), model.answer_header, model.turn_end)
            run = longest_shared_run(model.encode(answer), earlier)
            runs.append(run)
            rows.append({"conversation": conv[0], "turn": k + 1, "message": conv[k], "answer": answer,
                         "longest_shared_run": run})
    reminder = chats.template.after
    said = [(conv[k], answer) for conv, turns in zip(FOLLOW_UPS, answered, strict=True)
            for k, (_, answer) in enumerate(turns)]  # every turn of the conversations, the first too
    turn1 = chats.answer_all([chats.prompt([], p.message) for p in PROMPTS], MAX_TOKENS, copy_penalty)
    report1 = judge({p.message: a for p, a in zip(PROMPTS, turn1, strict=True)})
    earlier_turns = chats.conversations([EARLIER], MAX_TOKENS, copy_penalty)[0]
    past = [PastTurn(i, m, a) for i, (m, (_, a)) in enumerate(zip(EARLIER, earlier_turns, strict=True), 1)]
    turn3 = chats.answer_all([chats.prompt(past, p.message) for p in PROMPTS], MAX_TOKENS, copy_penalty)
    report = judge({p.message: a for p, a in zip(PROMPTS, turn3, strict=True)})
    after_stub = chats.answer_all([chats.prompt([PastTurn(1, *STUB_TURN)], p.message) for p in PROMPTS], MAX_TOKENS,
                                  copy_penalty)
    stub_report = judge({p.message: a for p, a in zip(PROMPTS, after_stub, strict=True)})
    recall2 = chats.conversations([(fact, question) for fact, question, _ in RECALL], MAX_TOKENS, copy_penalty)
    recall4 = chats.conversations([(fact, *FILLER, question) for fact, question, _ in RECALL], MAX_TOKENS,
                                  copy_penalty)
    hits2 = sum(keyword_hit(t[-1][1], expect) for t, (_, _, expect) in zip(recall2, RECALL, strict=True))
    hits4 = sum(keyword_hit(t[-1][1], expect) for t, (_, _, expect) in zip(recall4, RECALL, strict=True))
    return {
        "copy_penalty": "model default" if copy_penalty is None else copy_penalty,
        "template": chats.template.version, "turn1_summary": report1.summary(), "turn1_hits": report1.hits,
        "answers": len(runs), "mean_longest_shared_run": round(sum(runs) / len(runs), 2),
        "long_copies": sum(r >= LONG_COPY for r in runs), "max_shared_run": max(runs),
        "turn3_quality": report.as_dict(), "turn3_summary": report.summary(),
        "after_stub_summary": stub_report.summary(), "after_stub_hits": stub_report.hits,
        "after_stub_copies": sum(a.strip() == STUB_TURN[1] for a in after_stub),
        "recall2_hits": hits2, "recall4_hits": hits4, "recall_total": len(RECALL),
        "narrating": sum(bool(NARRATES.search(a)) for a in [*(r["answer"] for r in rows), *turn1, *turn3]),
        "narrating_of": len(rows) + len(turn1) + len(turn3),
        "echoes": sum(echoes(m, a, reminder) for m, a in said),
        "showing_reminder": sum(shows_reminder(a, reminder) for _, a in said), "conversation_turns": len(said),
        "seconds": round(time.perf_counter() - start, 1), "follow_ups": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/answer_copies.json"))
    parser.add_argument("--model-dir", type=Path, help="default: the registry's served generation version")
    parser.add_argument("--templates", default=DEFAULT_TEMPLATES, help="the prompt templates file")
    parser.add_argument("--template", default="", help="its version to use (default: its current)")
    parser.add_argument("--penalties", default="0,default",
                        help="comma-separated copy_penalty values to compare; 'default' is the model's")
    args = parser.parse_args(argv)
    chats = Chats.served(load_file(args.templates).get(args.template), args.model_dir)
    model, version = chats.model, chats.model.version
    results = []
    for value in (v.strip() for v in args.penalties.split(",") if v.strip()):
        r = evaluate(chats, None if value == "default" else float(value))
        results.append(r)
        print(f"copy_penalty {r['copy_penalty']}: longest run shared with an earlier answer, mean "
              f"{r['mean_longest_shared_run']} tokens over {r['answers']} answers, {r['long_copies']} of them "
              f">= {LONG_COPY} (max {r['max_shared_run']}); template {r['template']}: turn 1 {r['turn1_summary']}; "
              f"turn 3 {r['turn3_summary']}; after a stub answer {r['after_stub_summary']}, "
              f"{r['after_stub_copies']} of them the stub again; "
              f"{r['narrating']}/{r['narrating_of']} answers narrate \"the user\"; "
              f"{r['echoes']}/{r['conversation_turns']} conversation turns echo the user's message, "
              f"{r['showing_reminder']} show the hidden reminder; "
              f"recall at turn 2 "
              f"{r['recall2_hits']}/{r['recall_total']}, at turn 4 {r['recall4_hits']}/{r['recall_total']} "
              f"({r['seconds']} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": version, "sampling": model.sampling, "results": results},
                                   indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
