"""Long conversations: TTFT as history grows, and what keeping the KV cache between turns saves.

1. Through the gateway: conversations of ``--turns`` turns (greedy, the same max_tokens every turn);
   TTFT (first delta the client sees) at turns 1, 5, 10 and 20, median over the conversations.
   The prompt stage sends the whole history every turn; the generation engine continues the
   conversation's kept KV cache (its prefix cache) and prefills only what changed.
2. Colloquy's engine (``AsyncEngine``, in process, the served model) on the same conversation as the
   prompt service renders it (current template: hidden reminder on the newest user message): TTFT
   per turn with the prefix cache (``reuse``) and without it (``fresh``: every turn prefills the
   whole conversation), prompt tokens reused per turn, and whether both gave the same answers.
3. ONNX Runtime GenAI directly, the same kind of conversation in ChatML: at every turn
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
import dataclasses
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


def engine_conversations(turns: int, count: int, tokens: int) -> dict[str, Any]:
    """Part 2: AsyncEngine with and without the prefix cache, the same greedy conversations."""
    import asyncio

    from prometheus_client import REGISTRY

    from model.chat_template import render_chatml
    from services.generation.config import EngineSettings
    from services.generation.engine import AsyncEngine, Request, Sampling
    from services.prompt.config import DEFAULT_TEMPLATES
    from services.prompt.templates import load_file

    template = load_file(DEFAULT_TEMPLATES).get()
    model_dir, version = common.served_model()
    greedy = Sampling(temperature=0, repetition_penalty=1.0, copy_penalty=0.0, max_tokens=tokens)
    reused_metric = "colloquy_generation_prefix_cache_reused_tokens_total"

    def prompt(history: list[dict[str, str]], message: str) -> str:
        tail = f"{message}\n\n{template.after}" if template.after else message
        return render_chatml([{"role": "system", "content": template.before}, *history,
                              {"role": "user", "content": tail}])

    async def turn(eng: AsyncEngine, rid: str, text: str, conv: str) -> tuple[float, str, int]:
        start = time.perf_counter()
        first, answer, prompt_tokens = 0.0, "", 0
        async for deltas in eng.submit(Request(rid, text, greedy, conversation_id=conv)):
            for d in deltas:
                if d.tokens and not first:
                    first = time.perf_counter()
                answer += d.text
                prompt_tokens = d.prompt_tokens
        return first - start, answer, prompt_tokens

    out: dict[str, Any] = {}
    answers: dict[str, list[str]] = {}
    base = EngineSettings(max_running=8)
    for mode in ("reuse", "fresh"):
        cfg = dataclasses.replace(base, prefix_cache_conversations=16 if mode == "reuse" else 0)
        eng = AsyncEngine(model_dir, version, cfg)
        ttft: dict[int, list[float]] = {}
        reused: dict[int, list[float]] = {}
        prompt_len: dict[int, int] = {}
        try:
            for c in range(count + 1):
                history: list[dict[str, str]] = []
                for t in range(turns if c else 3):  # conversation 0: a 3-turn warm-up, dropped
                    message = MESSAGES[t % len(MESSAGES)]
                    before = REGISTRY.get_sample_value(reused_metric) or 0.0
                    secs, answer, n = asyncio.run(turn(eng, f"bench-{c}-{t}", prompt(history, message),
                                                       f"bench-{mode}-{c}"))
                    history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
                    if c == 0:
                        continue
                    answers.setdefault(mode, []).append(answer)
                    ttft.setdefault(t + 1, []).append(secs * 1000)
                    reused.setdefault(t + 1, []).append((REGISTRY.get_sample_value(reused_metric) or 0.0) - before)
                    prompt_len[t + 1] = n
                log(f"conversation: engine ({mode}) conversation {c}/{count} done")
        finally:
            asyncio.run(eng.close())
        out[mode] = {str(t): {"prompt_tokens": prompt_len[t], "ttft_ms": summary(v, 1),
                              "reused_tokens": summary(reused[t], 0)} for t, v in sorted(ttft.items())}
    first, last = out["reuse"].get("1"), out["reuse"].get(str(turns))
    ratio = {m: round(out[m][str(turns)]["ttft_ms"]["median"] / out[m]["1"]["ttft_ms"]["median"], 2)
             for m in out if first and last}
    same = sum(a == b for a, b in zip(answers.get("reuse", []), answers.get("fresh", []), strict=False))
    return {**out, f"turn{turns}_over_turn1": ratio, "same_answers": same,
            "compared": len(answers.get("reuse", [])), "engine": dataclasses.asdict(base)}


def start(args: argparse.Namespace) -> Record:
    _, version = common.served_model()
    return Record(NAME, {"model_version": version, "max_tokens": args.tokens, "turns": args.turns,
                         "conversations": args.conversations, "kv_conversations": args.kv_conversations,
                         "method": __doc__.split("\n", 2)[2].strip().replace("\n", " ")}, settle_s=common.SETTLE_S)


def run_kv(rec: Record, args: argparse.Namespace) -> None:
    """Parts 2 and 3 (in process, no stack): run them before any stack starts so idle services do
    not compete."""
    log("conversation: Colloquy's engine with and without its prefix cache")
    before = common.loadavg()
    rec.results["engine"] = engine_conversations(args.turns, args.kv_conversations, args.tokens)
    rec.results["engine"]["loadavg"] = {"before": before, "after": common.loadavg()}
    log("conversation: KV reuse with ONNX Runtime GenAI directly")
    before = common.loadavg()
    rec.results["kv_reuse"] = kv_reuse(args.turns, args.kv_conversations, args.tokens)
    rec.results["kv_reuse"]["loadavg"] = {"before": before, "after": common.loadavg()}
    if args.conversations > 0:  # written now: the stack may wait a long time for its lock
        rec.skip("gateway", "not run: written before the stack started (waiting for its lock); "
                 "`python -m bench conversation --resume` runs only this part")
        rec.finish()


def run_gateway(rec: Record, args: argparse.Namespace, stack: Any) -> None:
    rec.unskip("gateway")
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
    eng = doc["results"].get("engine", {})
    marks = [str(m) for m in MARKS if str(m) in kv or str(m) in gw or str(m) in eng.get("reuse", {})]
    body = []
    for m in marks:
        g = gw.get(m, {}).get("ttft_ms", {})
        k = kv.get(m, {})
        er, ef = eng.get("reuse", {}).get(m, {}), eng.get("fresh", {}).get(m, {})
        body.append([m, er.get("prompt_tokens", "-"), g.get("median"), g.get("p99"),
                     ef.get("ttft_ms", {}).get("median", "-"), er.get("ttft_ms", {}).get("median", "-"),
                     er.get("reused_tokens", {}).get("median", "-"),
                     k.get("prompt_tokens"), k.get("fresh_ttft_ms", {}).get("median"),
                     k.get("continued_ttft_ms", {}).get("median"), f"{k.get('speedup')}x" if k else "-"])
    out = common.table(body, ["turn", "prompt tok", "gateway TTFT p50", "p99", "engine fresh", "engine reuse",
                              "reused tok", "ORT prompt tok", "ORT fresh", "ORT continued", "KV gain"])
    out += "\n(times in ms; gateway and engine reuse: generation's prefix cache on, as deployed)"
    turns = doc["params"].get("turns", 20)
    t1, tn = gw.get("1", {}).get("ttft_ms", {}).get("median"), gw.get(str(turns), {}).get("ttft_ms", {}).get("median")
    if t1 and tn:
        out += f"\ngateway turn {turns} / turn 1: {tn / t1:.2f}x"
    ratio = eng.get(f"turn{turns}_over_turn1")
    if ratio:
        out += (f"\nengine turn {turns} / turn 1: {ratio.get('reuse')}x with the prefix cache, "
                f"{ratio.get('fresh')}x without; same answers {eng.get('same_answers')} of {eng.get('compared')}")
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--conversations", type=int, default=2, help="gateway conversations (after a warm-up one)")
    p.add_argument("--kv-conversations", type=int, default=2, help="ORT GenAI conversations (after a warm-up)")
