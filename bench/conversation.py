"""Long conversations: TTFT as history grows, and what keeping the KV cache between turns would save.

1. Through the gateway: conversations of ``--turns`` turns (greedy, the same max_tokens every turn);
   TTFT (first delta the client sees) at turns 1, 5, 10 and 20, median over the conversations.
   The prompt stage sends the whole history every turn, so each turn re-prefills it.
2. ONNX Runtime GenAI directly, the same kind of conversation in ChatML: at every turn
   - ``fresh``: a new Generator prefills the whole conversation so far (what generation does today);
   - ``continued``: one Generator kept across turns gets ``append_tokens`` of only the new tokens
     (the end of the previous answer, the new user message, the assistant header).
   Both see exactly the same token ids (the continued Generator's sequence); TTFT is append +
   first token. Answers are pinned to max_tokens (EOS masked) so both grow alike.
A short warm-up conversation before each part is dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

from bench import common
from bench.common import Record, log, summary

NAME = "conversation"
MARKS = (1, 5, 10, 20)

MESSAGES = [
    "Hi! I am planning a trip to Italy next spring.",
    "I have about ten days. Which cities should I visit?",
    "I like food and museums. What should I see in Rome?",
    "How many days should I spend in Florence?",
    "What is the best way to travel from Rome to Florence?",
    "Is Venice worth a visit, or is it too crowded?",
    "What food should I try in Venice?",
    "Can you suggest a day trip from Florence?",
    "How much money should I budget per day?",
    "Should I book museum tickets in advance?",
    "What should I pack for the weather in April?",
    "Do I need to speak Italian?",
    "What are some polite phrases I should learn?",
    "How do tips work in Italian restaurants?",
    "Is it safe to walk around at night?",
    "What is a good souvenir to bring home?",
    "Can you recommend a cooking class?",
    "How early should I arrive at the train station?",
    "What should I do on my last evening in Rome?",
    "Can you summarise my whole itinerary in a few lines?",
]


def gateway_conversations(stack: Any, turns: int, count: int, tokens: int) -> dict[str, Any]:
    from bench.pipeline import gateway_chat

    per_turn: dict[int, list[float]] = {}
    tokens_seen: dict[int, list[int]] = {}
    for c in range(count + 1):
        conv = ""
        for t in range(turns if c else 2):  # conversation 0: a 2-turn warm-up, dropped
            r = gateway_chat(stack, MESSAGES[t % len(MESSAGES)], tokens, conv)
            conv = r["conversation_id"]
            if c == 0 or r["ttft_s"] is None:
                continue  # warm-up conversation
            per_turn.setdefault(t + 1, []).append(r["ttft_s"] * 1000)
            tokens_seen.setdefault(t + 1, []).append(r["tokens"])
        log(f"conversation: gateway conversation {c}/{count} done")
    return {str(t): {"ttft_ms": summary(v, 1), "answer_tokens": summary(tokens_seen[t], 0)}
            for t, v in sorted(per_turn.items())}


def kv_reuse(turns: int, count: int, tokens: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    from model.genai import load, read_genai_config

    model_dir, _ = common.served_model()
    model, tok = load(model_dir, "cpu")
    cfg = read_genai_config(model_dir)
    max_len = int(cfg["model"].get("context_length") or cfg["search"]["max_length"])
    enc = lambda s: [int(t) for t in tok.encode(s)]  # noqa: E731
    system = enc(common.chat_prompt("x").split("<|im_start|>user")[0])  # the default system block

    def first_token(gen: Any, new: list[int]) -> float:
        start = time.perf_counter()
        gen.append_tokens(new)
        gen.generate_next_token()
        return time.perf_counter() - start

    fresh: dict[int, list[float]] = {}
    cont: dict[int, list[float]] = {}
    prompt_len: dict[int, int] = {}
    same = compared = 0
    for c in range(count + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_len, min_length=max_len, do_sample=False)
        kept = og.Generator(model, params)
        history: list[int] = []
        for t in range(turns if c else 3):  # conversation 0: a 3-turn warm-up, dropped
            user = enc(f"<|im_start|>user\n{MESSAGES[t % len(MESSAGES)]}<|im_end|>\n<|im_start|>assistant\n")
            new = (system if t == 0 else enc("<|im_end|>\n")) + user
            if len(history) + len(new) + tokens >= max_len:
                break
            whole = history + new
            p = og.GeneratorParams(model)
            p.set_search_options(max_length=len(whole) + 1, do_sample=False)
            scratch = og.Generator(model, p)
            t_fresh = first_token(scratch, whole)
            fresh_first = int(scratch.get_next_tokens()[0])
            del scratch
            t_cont = first_token(kept, new)
            same += int(int(kept.get_next_tokens()[0]) == fresh_first)
            compared += 1
            for _ in range(tokens - 1):
                kept.generate_next_token()
            history = [int(x) for x in kept.get_sequence(0)]
            if c == 0:
                continue
            fresh.setdefault(t + 1, []).append(t_fresh * 1000)
            cont.setdefault(t + 1, []).append(t_cont * 1000)
            prompt_len[t + 1] = len(whole)
        log(f"conversation: ORT GenAI conversation {c}/{count} done")
        del kept
    out = {str(t): {"prompt_tokens": prompt_len[t], "fresh_ttft_ms": summary(fresh[t], 1),
                    "continued_ttft_ms": summary(cont[t], 1),
                    "speedup": round(statistics.median(fresh[t]) / statistics.median(cont[t]), 2)}
           for t in sorted(fresh)}
    return {"turns": out, "same_first_token": same, "compared": compared}


def start(args: argparse.Namespace) -> Record:
    _, version = common.served_model()
    return Record(NAME, {"model_version": version, "max_tokens": args.tokens, "turns": args.turns,
                         "conversations": args.conversations, "kv_conversations": args.kv_conversations,
                         "method": __doc__.split("\n", 2)[2].strip().replace("\n", " ")})


def run_kv(rec: Record, args: argparse.Namespace) -> None:
    """Part 2 (in process, no stack): run it before any stack starts so idle services do not compete."""
    log("conversation: KV reuse with ONNX Runtime GenAI directly")
    before = common.loadavg()
    rec.results["kv_reuse"] = kv_reuse(args.turns, args.kv_conversations, args.tokens)
    rec.results["kv_reuse"]["loadavg"] = {"before": before, "after": common.loadavg()}


def run_gateway(rec: Record, args: argparse.Namespace, stack: Any) -> None:
    before = common.loadavg()
    rec.results["gateway"] = gateway_conversations(stack, args.turns, args.conversations, args.tokens)
    rec.results["gateway"]["loadavg"] = {"before": before, "after": common.loadavg()}


def finish(rec: Record) -> dict[str, Any]:
    doc = rec.finish()
    print(render(doc))
    return doc


def run(args: argparse.Namespace, stack: Any = None) -> dict[str, Any]:
    rec = start(args)
    run_kv(rec, args)
    if args.conversations > 0:
        with common.stack() if stack is None else contextlib.nullcontext(stack) as s:
            run_gateway(rec, args, s)
    return finish(rec)


def render(doc: dict[str, Any]) -> str:
    gw = {k: v for k, v in doc["results"].get("gateway", {}).items() if k != "loadavg"}
    kv = doc["results"]["kv_reuse"]["turns"]
    marks = [str(m) for m in MARKS if str(m) in kv or str(m) in gw]
    body = []
    for m in marks:
        g = gw.get(m, {}).get("ttft_ms", {})
        k = kv.get(m, {})
        body.append([m, k.get("prompt_tokens"), g.get("median"), g.get("p99"),
                     k.get("fresh_ttft_ms", {}).get("median"), k.get("continued_ttft_ms", {}).get("median"),
                     f"{k.get('speedup')}x" if k else "-"])
    return common.table(body, ["turn", "prompt tok", "gateway TTFT p50", "p99", "ORT fresh", "ORT continued",
                               "KV gain"]) + "\n(times in ms)"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--conversations", type=int, default=2, help="gateway conversations (after a warm-up one)")
    p.add_argument("--kv-conversations", type=int, default=2, help="ORT GenAI conversations (after a warm-up)")
