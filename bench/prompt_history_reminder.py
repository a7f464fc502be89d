"""Template v1 vs v3 (the reminder kept on earlier user messages): answer quality and prefix reuse.

In-process, no stack: prompts are assembled by the prompt service's own `Assembler` with the real
tokenizer, and answered by the served model (the registry's current `generation` version) through
onnxruntime-genai at its manifest's served sampling defaults, tokens picked by the engine's own
`next_token` (temperature 0 there: greedy, with the repetition penalty over recent generated
tokens), at answer_quality's MAX_TOKENS.

(a) quality: every prompt of model.answer_quality asked as turn 3, after two fixed earlier turns
(their answers generated under the same template), judged by answer_quality.judge; and recall
conversations (a fact at turn 1, then the question at turn 2; and the fact, two unrelated turns,
the question at turn 4), judged by keyword.
As turn 1 the two templates give byte-identical prompts, so single-turn quality cannot differ.
(b) prefix reuse: for each recall conversation and k = 1..3, the share of turn k+1's prompt
tokens that are a prefix of turn k's prompt tokens + the generated answer tokens (what the
engine's prefix cache holds after turn k when it also keeps finished answers; the new message
can never be a hit, so the ceiling is below 1), and the share of those turn-k tokens reused.

    .venv/bin/python -m bench.prompt_history_reminder [--out bench/results/prompt_history_reminder.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

from model import genai
from model.answer_quality import MAX_TOKENS, PROMPTS, judge, keyword_hit
from model.registry import Registry
from services.generation.sampler import next_token
from services.prompt.config import DEFAULT_TEMPLATES
from services.prompt.domain import Assembler, PastTurn
from services.prompt.templates import PromptTemplate, load_file
from services.tokenizer.domain import TextTokenizer

EARLIER = ("Hi, I have a dog called Biscuit.", "I am planning a trip next month.")
RECALL: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Hi, I have a dog called Biscuit.", "What is my dog's name?", ("Biscuit",)),
    ("Hi, my name is Sam.", "What is my name?", ("Sam",)),
    ("My favourite colour is green.", "What is my favourite colour?", ("green",)),
    ("I live in Lisbon.", "Which city do I live in?", ("Lisbon",)),
    ("My cat is called Pixel.", "What is my cat called?", ("Pixel",)),
    ("I work as a nurse.", "What is my job?", ("nurse",)),
    ("My sister's name is Maria.", "What is my sister's name?", ("Maria",)),
    ("I was born in 1990.", "In which year was I born?", ("1990",)),
)
FILLER = ("What is the capital of France?", "Give me one tip for sleeping better.")


def generate(model: Any, prompt_ids: list[int], max_new: int, eos: set[int], sampling: dict[str, Any]) -> list[int]:
    """Token ids after `prompt_ids` as the engine picks them at the served defaults (greedy at
    temperature 0, its repetition penalty over the last `repetition_window` generated tokens, via
    the engine's own `next_token`), the end-of-turn token included when reached."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt_ids)
    penalty, window = float(sampling["repetition_penalty"]), int(sampling["repetition_window"])
    rng = np.random.default_rng(0)
    out: list[int] = []
    while len(out) < max_new:
        logits = np.asarray(gen.get_logits(), dtype=np.float32)
        logits = logits.reshape(-1, logits.shape[-1])[-1]
        token = next_token(logits, temperature=float(sampling["temperature"]), top_p=float(sampling["top_p"]),
                           top_k=int(sampling["top_k"]), penalty=penalty,
                           recent=out[-window:] if window > 0 else (), rng=rng)
        out.append(token)
        if token in eos:
            break
        gen.append_tokens([token])
    return out


class Chat:
    """Runs conversations turn by turn the way the pipeline does: assemble, answer, record."""

    def __init__(self, model: Any, tok: TextTokenizer, eos: set[int], sampling: dict[str, Any]) -> None:
        self.model, self.tok, self.eos, self.sampling = model, tok, eos, sampling
        self.assembler = Assembler(tok, 8192)

    def turn(self, template: PromptTemplate, past: list[PastTurn], message: str) -> tuple[list[int], list[int], str]:
        """(prompt ids, answer ids, answer text) of `message` after `past`."""
        prompt = self.assembler.assemble(template, past, message).prompt
        ids = self.tok.encode(prompt)
        answer = generate(self.model, ids, MAX_TOKENS, self.eos, self.sampling)
        text = self.tok.decode_batch([[t for t in answer if t not in self.eos]], skip_special_tokens=True)[0]
        return ids, answer, text

    def conversation(self, template: PromptTemplate, messages: list[str]) -> list[tuple[list[int], list[int], str]]:
        past: list[PastTurn] = []
        out = []
        for i, message in enumerate(messages, 1):
            ids, answer, text = self.turn(template, past, message)
            out.append((ids, answer, text))
            past.append(PastTurn(i, message, text))
        return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def evaluate(chat: Chat, template: PromptTemplate) -> dict[str, Any]:
    start = time.perf_counter()
    earlier = chat.conversation(template, list(EARLIER))
    past = [PastTurn(i, m, t[2]) for i, (m, t) in enumerate(zip(EARLIER, earlier, strict=True), 1)]
    answers = {p.message: chat.turn(template, past, p.message)[2] for p in PROMPTS}
    report = judge(answers)
    recall2_hits, recall2_rows = 0, []
    for fact, question, expect in RECALL:
        answer = chat.conversation(template, [fact, question])[-1][2]
        hit = keyword_hit(answer, expect)
        recall2_hits += hit
        recall2_rows.append({"question": question, "answer": answer, "hit": hit})
    recall_hits, recall_rows, shares, reused = 0, [], [], []
    for fact, question, expect in RECALL:
        turns = chat.conversation(template, [fact, *FILLER, question])
        hit = keyword_hit(turns[-1][2], expect)
        recall_hits += hit
        recall_rows.append({"question": question, "answer": turns[-1][2], "hit": hit})
        for (ids, answer, _), (next_ids, _, _) in itertools.pairwise(turns):
            same = common_prefix(ids + answer, next_ids)
            shares.append(same / len(next_ids))
            reused.append(same / len(ids + answer))
    return {"template": template.version, "after_in_history": template.after_in_history,
            "turn3_quality": report.as_dict(), "turn3_summary": report.summary(),
            "recall2_hits": recall2_hits, "recall2": recall2_rows,
            "recall_hits": recall_hits, "recall_total": len(RECALL), "recall": recall_rows,
            "prefix_share_mean": round(sum(shares) / len(shares), 4),
            "prefix_share_min": round(min(shares), 4), "prefix_share_n": len(shares),
            "previous_reused_mean": round(sum(reused) / len(reused), 4),
            "earlier_answers": [t[2] for t in earlier], "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/prompt_history_reminder.json"))
    parser.add_argument("--versions", default="v1,v3", help="comma-separated template versions")
    args = parser.parse_args(argv)
    templates = load_file(DEFAULT_TEMPLATES)
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    if not versions:
        parser.error("--versions: name at least one template version")
    chosen = [templates.get(v) for v in versions]
    reg = Registry()
    served = reg.current("generation")
    model_dir = reg.versions_dir / served
    model, og_tok = genai.load(model_dir, "cpu")
    tok = TextTokenizer.from_file(str(model_dir / "tokenizer.json"))
    sampling = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))["sampling"]
    chat = Chat(model, tok, set(og_tok.eos_token_ids), sampling)
    results = []
    for template in chosen:
        r = evaluate(chat, template)
        results.append(r)
        print(f"{template.version}: turn 3 {r['turn3_summary']}; "
              f"recall at turn 2 {r['recall2_hits']}/{r['recall_total']}, "
              f"at turn 4 {r['recall_hits']}/{r['recall_total']}; "
              f"prefix share of turn k+1 (mean over {r['prefix_share_n']}) {r['prefix_share_mean']:.3f}, "
              f"min {r['prefix_share_min']:.3f}; share of turn k's prompt + answer reused "
              f"{r['previous_reused_mean']:.3f} ({r['seconds']} s)", flush=True)
    base = results[0]
    for r in results[1:]:
        print(f"{r['template']} vs {base['template']}: turn-3 hits {r['turn3_quality']['hits']} vs "
              f"{base['turn3_quality']['hits']}, recall at turn 2 {r['recall2_hits']} vs {base['recall2_hits']}, "
              f"at turn 4 {r['recall_hits']} vs {base['recall_hits']}, "
              f"prefix share {r['prefix_share_mean']:.3f} vs {base['prefix_share_mean']:.3f} "
              f"({r['prefix_share_mean'] / base['prefix_share_mean']:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": served, "sampling": sampling, "max_tokens": MAX_TOKENS,
                                    "results": results}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
