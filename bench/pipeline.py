"""Pipeline overhead: TTFT and inter-token latency through the gateway vs the deployment called directly.

Per chat: a new conversation, greedy, max_tokens fixed. Through the gateway: ``ChatService/Chat``
with the dev key; TTFT is the first ``delta`` event the client sees. Directly: the prompt the
pipeline would build for that message (``PromptService/AssemblePrompt``: same hidden instructions,
same token count) sent to ``GenerationService/Generate`` on Ray Serve; TTFT is the first message
with tokens. Overhead = gateway TTFT - direct TTFT, paired chat by chat (same message, run back to
back, so load drift hits both). Output moderation releases text in checked chunks (at least
MODERATION_CHUNK_MIN_CHARS characters), so the gateway's first delta waits for more than one
token: the JSON also has the direct time to the same number of characters, which separates that
hold from the transport (Kafka hops, gateway). Inter-token latency: the time per token after an
answer's first arrival (for the gateway, the tokens after its first delta are estimated from the
share of the text). Before the first phase and after each restart of moderation, `--warmup-chats`
chats warm the stack up; one warm-up round per phase is dropped too. Baseline for decode speed:
at 1 chat, ONNX Runtime GenAI used directly in this process runs the same prompt, back to back
with the two calls above, so "decode through the pipeline vs ORT GenAI direct" compares figures
taken under the same load.

Output moderation's two release modes (policy.yaml `output.mode`, services/moderation/README.md)
run in the same stack, one after the other at each concurrency level (the moderation service is
restarted with a policy file that differs only in the mode; the order alternates between levels
so one restart serves two phases). Results: "<chats>" for hold (the shipped mode) and
"<chats> stream_first". Each phase also reads every stage's ``colloquy_stage_seconds`` histogram
(Prometheus, scraped before and after) for its own time split: arrival (the upstream's send to
this stage's poll: the upstream's commit and the fetch), process, send, commit.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bench import common
from bench.common import Record, log, summary
from services.common import topics

NAME = "pipeline"
DONE = False  # set once this process wrote a complete pipeline.json


def gateway_chat(stack: Any, message: str, tokens: int, conv: str = "") -> dict[str, Any]:
    """One Chat call; times of the first delta and of the done event, and what arrived."""
    import grpc
    from colloquy.v1 import chat_pb2, chat_pb2_grpc, common_pb2

    with grpc.insecure_channel(stack.gateway) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        start, wall = time.perf_counter(), time.time()
        first, first_chars, gaps, last, conv_id, turn = 0.0, 0, [], 0.0, conv, 0
        text = ""
        usage = 0
        for ev in stub.Chat(chat_pb2.ChatRequest(
                conversation_id=conv, message=message,
                sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=tokens)),
                metadata=common.DEV_KEY, timeout=600):
            now = time.perf_counter()
            kind = ev.WhichOneof("event")
            if kind == "started":
                conv_id, turn = ev.started.conversation_id, ev.started.turn_index
            elif kind == "delta" and ev.delta.index == 0 and ev.delta.text:
                if not first:
                    first, first_chars = now, len(ev.delta.text)
                else:
                    gaps.append(now - last)
                last = now
                text += ev.delta.text
            elif kind == "done":
                usage = ev.done.usage.completion_tokens
    return {"start": start, "wall_start_ms": wall * 1000,
            "first_wall_ms": (wall + first - start) * 1000 if first else None,
            "last_wall_ms": (wall + last - start) * 1000 if last else None,
            "ttft_s": first - start if first else None, "first_chars": first_chars,
            "gaps_s": gaps, "stream_s": last - first if first else 0.0, "tokens": usage, "text": text,
            "conversation_id": conv_id, "turn": turn}


def assembled_prompt(stack: Any, message: str) -> str:
    """What the prompt stage would send to generation for this message in a new conversation."""
    import grpc
    from colloquy.v1 import prompt_pb2, prompt_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['prompt']}") as ch:
        resp = prompt_pb2_grpc.PromptServiceStub(ch).AssemblePrompt(
            prompt_pb2.AssemblePromptRequest(conversation_id=str(uuid.uuid4()), message=message, user_id="dev"),
            timeout=60)
    return resp.prompt


def direct_generate(stack: Any, prompt: str, tokens: int, chars_mark: int = 0) -> dict[str, Any]:
    """One Generate call on Ray Serve's gRPC proxy (no Kafka, no gateway)."""
    import grpc
    from colloquy.v1 import common_pb2, generation_pb2, generation_pb2_grpc

    rid = f"bench-{uuid.uuid4().hex}"
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['generation']}") as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        start = time.perf_counter()
        first, last, gaps, n, text, mark, first_tokens = 0.0, 0.0, [], 0, "", None, 0
        for msg in stub.Generate(generation_pb2.GenerateRequest(
                prompt=prompt, request_id=rid, sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=tokens)),
                metadata=(("session_id", rid),), timeout=600):
            if not msg.delta_tokens:
                continue
            now = time.perf_counter()
            if not first:
                first, first_tokens = now, msg.delta_tokens
            else:
                gaps.append(now - last)
            last = now
            n += msg.delta_tokens
            text += msg.delta
            if mark is None and chars_mark and len(text) >= chars_mark:
                mark = now - start
    return {"start": start, "ttft_s": first - start if first else None, "gaps_s": gaps,
            "stream_s": last - first if first else 0.0, "tokens": n, "time_to_chars_s": mark,
            "tokens_after_first": n - first_tokens}


def _itl(r: dict[str, Any]) -> float | None:
    """Mean time per token after the first arrival of one answer (seconds).

    The first arrival carries several tokens (the deployment coalesces a stream interval; the
    gateway's first delta is output moderation's first checked chunk), so only the tokens that
    came after it count: known for the direct call, estimated from the share of the text for the
    gateway (its deltas carry text, not token counts).
    """
    after = r.get("tokens_after_first")
    if after is None and r.get("text"):
        after = r["tokens"] * (1 - r["first_chars"] / len(r["text"]))
    return r["stream_s"] / after if after and after >= 1 and r["stream_s"] else None


# The path of a chat's first tokens: each stage's output topic, in order (keys: conversation id).
HOPS = (("gateway accepts, produces", "chat.requests"), ("tokenizer", "chat.tokenized"),
        ("input moderation", "chat.moderated"), ("prompt assembly", "chat.prompts"),
        ("generation: prefill, first tokens", "generation.progress"),
        ("output moderation: first chunk", topics.REPLY_PREFIX), ("gateway to client", None))


def hop_breakdown(bootstrap: str, chats: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a chat's time to first token goes, hop by hop, from the Kafka record timestamps;
    and the decode speed a person sees through the pipeline.

    Each record's timestamp is its producer's send time (CreateTime, one clock: one machine), so
    a hop's figure runs from the previous stage's send to this one's: the previous transaction's
    commit, the fetch, and this stage's work. The generation hop holds the model's prefill; the
    output-moderation hop holds the wait for the first checked chunk's characters.
    """
    from kafka import KafkaConsumer, TopicPartition

    chats = [c for c in chats if c.get("first_wall_ms") and c.get("conversation_id")]
    if not chats:
        return {}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                             enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        names = [t for t in consumer.topics() if _hop_of(t)]
        parts = [TopicPartition(t, p) for t in names for p in consumer.partitions_for_topic(t) or ()]
        consumer.assign(parts)
        since = int(min(c["wall_start_ms"] for c in chats)) - 1000
        for tp, found in consumer.offsets_for_times({tp: since for tp in parts}).items():
            if found is None:
                consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, found.offset)
        keys = {c["conversation_id"] for c in chats}
        first: dict[tuple[str, str], int] = {}
        first_token: dict[str, int] = {}  # when generation made each chat's first token
        for rec in consumer:
            key = rec.key.decode("utf-8", "replace") if rec.key else ""
            if key in keys:
                hop = _hop_of(rec.topic)
                if hop == topics.REPLY_PREFIX:
                    reply = _decode(rec, "ReplyEvent")
                    if reply is None or reply.WhichOneof("reply") != "text":
                        continue  # "started" and other replies come before any text
                first[(key, hop)] = min(first.get((key, hop), rec.timestamp), rec.timestamp)
                if hop == "generation.progress":
                    progress = _decode(rec, "GenerationProgress")
                    made = progress.first_token_unix_ms if progress is not None else 0
                    if made:
                        first_token[key] = min(first_token.get(key, made), made)
    finally:
        consumer.close()
    # A topic no chat's record went through is not on this stack's path (chat.tokenized unless the
    # tokenizer stage runs in the chain): the next hop then runs from the one before it.
    on_path = [(name, h) for name, h in HOPS if h is None or any(k[1] == h for k in first)]
    per_hop: dict[str, list[float]] = {name: [] for name, _ in on_path}
    for c in chats:
        seen = [first.get((c["conversation_id"], h)) for _, h in on_path if h]
        marks = [c["wall_start_ms"], *seen, c["first_wall_ms"]]
        if any(m is None for m in marks):
            continue
        for (name, _), a, b in zip(on_path, marks[:-1], marks[1:], strict=True):
            per_hop[name].append(b - a)
    # Decode as the person sees it: tokens after the first, from the moment generation made the
    # first token to the moment the last text reached the client (output moderation's last check
    # and every hop included). Biased neither by the first chunk's hold nor by chunking.
    delivered = [(c["tokens"] - 1) / ((c["last_wall_ms"] - first_token[c["conversation_id"]]) / 1000)
                 for c in chats if c.get("last_wall_ms") and c.get("tokens", 0) > 1
                 and c["conversation_id"] in first_token and c["last_wall_ms"] > first_token[c["conversation_id"]]]
    return {"hops_ms": {name: summary(v, 1) for name, v in per_hop.items() if v},
            "delivered_decode_tok_s": summary(delivered, 1)}


def _hop_of(topic: str) -> str | None:
    """The HOPS topic `topic` stands for (reply topics by their prefix), or None."""
    return next((h for _, h in HOPS if h and (topic == h or (h.endswith(".") and topic.startswith(h)))), None)


def _decode(rec: Any, type_name: str) -> Any:
    """The record as `colloquy.v1.<type_name>`, or None if it is not one."""
    from colloquy.v1 import events_pb2

    from services.common import events

    try:
        return events.decode(rec.value, rec.headers, getattr(events_pb2, type_name))
    except events.PoisonEvent:
        return None


def measure(stack: Any, concurrency: int, rounds: int, tokens: int, prompts: dict[str, str],
            ort: Any = None) -> dict[str, Any]:
    """`ort`: an in-process ORT GenAI (bench.engine.OrtGenai) run after each round, at 1 chat."""
    msgs = list(prompts)
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    baseline: list[dict[str, Any]] = []

    engine: dict[str, dict[str, Buckets]] = {"gateway": {}, "direct": {}}  # what each path added
    with cf.ThreadPoolExecutor(concurrency) as pool:
        for r in range(rounds + 1):
            batch = [msgs[(r * concurrency + i) % len(msgs)] for i in range(concurrency)]
            e0 = engine_histograms(stack)
            gw = list(pool.map(lambda m: gateway_chat(stack, m, tokens), batch))
            e1 = engine_histograms(stack)
            di = list(pool.map(lambda mg: direct_generate(stack, prompts[mg[0]], tokens, mg[1]["first_chars"]),
                               zip(batch, gw, strict=True)))
            e2 = engine_histograms(stack)
            base = [ort.single(ort.encode(prompts[m]), tokens) for m in batch] if ort is not None else []
            if r == 0:
                continue  # warm-up
            pairs += list(zip(gw, di, strict=True))
            baseline += base
            _accumulate(engine["gateway"], e0, e1)
            _accumulate(engine["direct"], e1, e2)
    ok = [(g, d) for g, d in pairs if g["ttft_s"] is not None and d["ttft_s"] is not None]
    ms = 1000.0
    over = [(g["ttft_s"] - d["ttft_s"]) * ms for g, d in ok]
    over_chars = [(g["ttft_s"] - d["time_to_chars_s"]) * ms for g, d in ok if d["time_to_chars_s"] is not None]
    extra: dict[str, Any] = {}
    try:
        extra.update(hop_breakdown(stack.bootstrap, [g for g, _ in ok]))
    except Exception as exc:  # a diagnostic: the goal figures stand without it
        log(f"pipeline: hop breakdown failed: {exc}")
    if any(engine.values()):
        extra["engine_ms"] = {path: {name: {"n": int(b[-1][1]), "p50": round(_bucket_quantile(b, 0.5) * 1000, 1)}
                                     for name, b in sorted(hists.items()) if b and b[-1][1] > 0}
                              for path, hists in engine.items()}
    if baseline:
        extra["ort_direct_itl_ms"] = summary([1000 / b["decode_tok_s"] for b in baseline if b["decode_tok_s"]], 2)
        extra["ort_direct_ttft_ms"] = summary([b["ttft_s"] * ms for b in baseline], 1)
    return {**extra,
        "chats": len(pairs), "complete": len(ok),
        "gateway_ttft_ms": summary([g["ttft_s"] * ms for g, _ in ok], 1),
        "direct_ttft_ms": summary([d["ttft_s"] * ms for _, d in ok], 1),
        "ttft_overhead_ms": summary(over, 1),
        "direct_time_to_first_delta_chars_ms": summary([d["time_to_chars_s"] * ms for _, d in ok
                                                        if d["time_to_chars_s"] is not None], 1),
        "ttft_overhead_beyond_moderation_hold_ms": summary(over_chars, 1),
        "first_delta_chars": summary([g["first_chars"] for g, _ in ok], 0),
        "gateway_itl_ms": summary([x * ms for g, _ in ok if (x := _itl(g)) is not None], 2),
        "direct_itl_ms": summary([x * ms for _, d in ok if (x := _itl(d)) is not None], 2),
        "gateway_delta_gap_ms": summary([x * ms for g, _ in ok for x in g["gaps_s"]], 1),
        "direct_message_gap_ms": summary([x * ms for _, d in ok for x in d["gaps_s"]], 1),
        "gateway_tokens": summary([g["tokens"] for g, _ in ok], 0),
        "direct_tokens": summary([d["tokens"] for _, d in ok], 0),
    }


def warm_up(stack: Any, chats: int, tokens: int, prompts: dict[str, str]) -> None:
    """Chats through the gateway and the deployment, one at a time, not measured: before the first
    phase and after each restart of moderation for a mode change. A freshly started process is
    slower than a running one for its first chats (the broker's JIT, a stage's first calls): on
    2026-12-04 the phase right after a start or restart had 1-chat hops 3-10 ms longer than the
    same mode measured after warm chats (bench/results/pipeline.md)."""
    log(f"pipeline: warming the stack up with {chats} chats (not measured)")
    for i in range(chats):
        message = list(prompts)[i % len(prompts)]
        chat = gateway_chat(stack, message, tokens)
        direct_generate(stack, prompts[message], tokens, chat["first_chars"])


def run(args: argparse.Namespace, stack: Any = None) -> dict[str, Any]:
    levels = [int(c) for c in str(args.concurrency).split(",") if c]
    model_dir, version = common.served_model()
    rec = Record(NAME, {"model_version": version, "max_tokens": args.tokens, "concurrency": levels,
                        "rounds": {str(c): _rounds(args, c) for c in levels}, "prompts": common.QUESTIONS,
                        "method": __doc__.split("\n\n")[1].replace("\n", " ")}, settle_s=common.SETTLE_S)
    ort = None
    if 1 in levels:
        from bench.engine import OrtGenai

        ort = OrtGenai(str(model_dir))
    modes = [m for m in str(args.modes).split(",") if m]
    rec.doc["params"]["modes"] = modes
    with common.stack() if stack is None else contextlib.nullcontext(stack) as s:
        prompts = {q: assembled_prompt(s, q) for q in common.QUESTIONS}
        rec.doc["params"]["assembled_prompt_chars"] = {q: len(p) for q, p in prompts.items()}
        current = shipped = _shipped_mode()
        rec.doc["params"]["warmup_chats"] = args.warmup_chats
        try:
            for i, c in enumerate(levels):
                for mode in (modes if i % 2 == 0 else modes[::-1]):
                    restarted = mode != current
                    if restarted:
                        set_mode(s, mode)
                        current = mode
                    if (restarted or not rec.results) and args.warmup_chats:
                        warm_up(s, args.warmup_chats, args.tokens, prompts)
                    log(f"pipeline: {c} concurrent chats, output moderation {mode}")
                    before = stage_histograms(s)
                    result = measure(s, c, _rounds(args, c), args.tokens, prompts, ort if c == 1 else None)
                    result["mode"] = mode
                    result["stage_split_ms"] = stage_split(before, stage_histograms(s))
                    rec.results[str(c) if mode == HOLD else f"{c} {mode}"] = result
        finally:
            if current != shipped:
                set_mode(s, shipped)  # a shared stack (bench/__main__) goes on as it was
    rec.doc["goals"] = goals(rec.results)
    doc = rec.finish()
    global DONE
    DONE = True
    print(render(doc))
    return doc


HOLD, STREAM_FIRST = "hold", "stream_first"


def _shipped_mode() -> str:
    from services.moderation import paths, policy

    return policy.load(paths.POLICY_FILE).output.mode


def set_mode(stack: Any, mode: str) -> None:
    """Restart the moderation service with the shipped policy file, its `output.mode` set to `mode`."""
    import yaml

    from services.moderation import paths

    doc = yaml.safe_load(paths.POLICY_FILE.read_text(encoding="utf-8"))
    doc.setdefault("output", {})["mode"] = mode
    path = Path(tempfile.gettempdir()) / f"colloquy-bench-policy-{mode}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    stack.extra_env.setdefault("moderation", {})["MODERATION_POLICY"] = str(path)
    log(f"pipeline: restarting moderation with output.mode={mode}")
    stack.restart("moderation")


Buckets = list[tuple[float, float]]  # [(le, cumulative count)], le ascending
# The engine's own view of each request (services/generation/metrics.py): queue = submission to the
# start of its prefill, ttft = submission to its first token. Split by path, they tell whether a turn
# that came through the pipeline waited longer inside the engine than one sent to it directly.
ENGINE_HISTOGRAMS = {"colloquy_generation_queue_time_seconds": "queue",
                     "colloquy_generation_time_to_first_token_seconds": "ttft"}


def replica_metrics_port(stack: Any) -> int:
    """The generation replica's /metrics port, when the stack gave it one (0: none)."""
    raw = getattr(stack, "extra_env", {}).get("generation", {}).get("GENERATION_REPLICA_METRICS_PORT", "0")
    return int(raw) if str(raw).isdigit() else 0


def engine_histograms(stack: Any) -> dict[str, Buckets]:
    """The (first) generation replica's queue and first-token histograms, summed over labels."""
    from prometheus_client.parser import text_string_to_metric_families

    port = replica_metrics_port(stack)
    text = _metrics_text(port) if port else None
    if text is None:
        return {}
    sums: dict[str, dict[float, float]] = {}
    for fam in text_string_to_metric_families(text):
        name = ENGINE_HISTOGRAMS.get(fam.name)
        if name is None:
            continue
        for smp in fam.samples:
            if smp.name.endswith("_bucket"):
                le = float(smp.labels["le"])
                sums.setdefault(name, {})[le] = sums.get(name, {}).get(le, 0.0) + smp.value
    return {name: sorted(b.items()) for name, b in sums.items()}


def _accumulate(into: dict[str, Buckets], before: dict[str, Buckets], after: dict[str, Buckets]) -> None:
    """Add what happened between two scrapes (`after` - `before`) to `into`, bucket by bucket."""
    for name, buckets in after.items():
        old, acc = dict(before.get(name, [])), dict(into.get(name, []))
        into[name] = sorted((le, acc.get(le, 0.0) + n - old.get(le, 0.0)) for le, n in buckets)


def _metrics_text(port: int) -> str | None:
    """One process's /metrics on this machine, or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return None


def stage_histograms(stack: Any) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Every process's colloquy_stage_seconds buckets, by (stage, part): [(le, cumulative count)]."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for name, port in getattr(stack, "metrics_ports", {}).items():
        if name not in stack.procs or (text := _metrics_text(port)) is None:
            continue
        for fam in text_string_to_metric_families(text):
            if fam.name != "colloquy_stage_seconds":
                continue
            for smp in fam.samples:
                if smp.name.endswith("_bucket"):
                    out.setdefault((smp.labels["stage"], smp.labels["part"]), []).append(
                        (float(smp.labels["le"]), smp.value))
    return out


def stage_split(before: dict[tuple[str, str], list[tuple[float, float]]],
                after: dict[tuple[str, str], list[tuple[float, float]]]) -> dict[str, dict[str, Any]]:
    """Per stage and part, what the phase added: count and p50 (ms, interpolated in its bucket)."""
    out: dict[str, dict[str, Any]] = {}
    for (stage, part), buckets in sorted(after.items()):
        old = dict(before.get((stage, part), []))
        delta = [(le, n - old.get(le, 0.0)) for le, n in sorted(buckets)]
        total = delta[-1][1] if delta else 0.0
        if total <= 0:
            continue
        out.setdefault(stage, {})[part] = {"n": int(total), "p50": round(_bucket_quantile(delta, 0.5) * 1000, 1)}
    return out


def _bucket_quantile(cumulative: list[tuple[float, float]], q: float) -> float:
    """Prometheus's histogram_quantile over [(le, cumulative count)], le ascending (+Inf last)."""
    rank, prev_le, prev_n = q * cumulative[-1][1], 0.0, 0.0
    for le, n in cumulative:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-9)
        prev_le, prev_n = le, n
    return prev_le


SPLIT_PARTS = ("arrival", "process", "send", "commit", "loop")
TRANSACTIONAL_HOPS = ("tokenizer", "input moderation", "prompt assembly")


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, from this run: TTFT overhead at 1 chat per mode, the transactional hops
    at 1 chat, and gateway vs direct TTFT at 16."""
    out: dict[str, Any] = {}
    for key, limit in (("1", 150.0), (f"1 {STREAM_FIRST}", 60.0)):
        over = (results.get(key) or {}).get("ttft_overhead_ms", {}).get("median")
        if over is not None:
            out[f"ttft_overhead_p50_ms[{key}] <= {limit:g}"] = {"measured": over, "met": over <= limit}
        hops = (results.get(key) or {}).get("hops_ms", {})
        for hop in TRANSACTIONAL_HOPS:
            if hop in hops:
                v = hops[hop]["median"]
                out[f"hop p50 ms[{key}: {hop}] <= 15"] = {"measured": v, "met": v <= 15}
    for key in ("16", f"16 {STREAM_FIRST}"):
        r = results.get(key) or {}
        g, d = r.get("gateway_ttft_ms", {}).get("median"), r.get("direct_ttft_ms", {}).get("median")
        if g and d:
            out[f"gateway/direct TTFT p50[{key}] <= 1.3"] = {"measured": round(g / d, 2), "met": g / d <= 1.3}
    return out


def _rounds(args: argparse.Namespace, concurrency: int) -> int:
    """Rounds per level: at least ``--samples`` chats in all (a round is ``concurrency`` chats)."""
    return max(args.min_rounds, -(-args.samples // concurrency))


def render(doc: dict[str, Any]) -> str:
    head = ["chats", "gateway TTFT p50/p99", "direct TTFT p50/p99", "overhead p50/p99",
            "overhead beyond mod. hold p50", "ITL gateway/direct ms"]
    body = []
    for c, r in doc["results"].items():
        body.append([f"{c} concurrent", f"{r['gateway_ttft_ms']['median']}/{r['gateway_ttft_ms']['p99']}",
                     f"{r['direct_ttft_ms']['median']}/{r['direct_ttft_ms']['p99']}",
                     f"{r['ttft_overhead_ms']['median']}/{r['ttft_overhead_ms']['p99']}",
                     r["ttft_overhead_beyond_moderation_hold_ms"]["median"],
                     f"{r['gateway_itl_ms']['median']}/{r['direct_itl_ms']['median']}"])
    out = common.table(body, head) + "\n(times in ms)"
    keys = [k for k, r in doc["results"].items() if r.get("hops_ms")]
    if keys:
        names = list(dict.fromkeys(n for k in keys for n in doc["results"][k]["hops_ms"]))
        rows = [[n, *[(doc["results"][k]["hops_ms"].get(n) or {}).get("median") for k in keys]] for n in names]
        out += "\n\nwhere the gateway's time to first token goes (p50 ms, from Kafka record timestamps):\n"
        out += common.table(rows, ["hop", *[f"{k} chats" if " " not in k else k.replace(" ", " chats ") for k in keys]])
    splits = [(k, r["stage_split_ms"]) for k, r in doc["results"].items() if r.get("stage_split_ms")]
    if splits:
        rows = []
        for k, split in splits:
            for stage, parts in split.items():
                rows.append([k, stage, *[(parts.get(p) or {}).get("p50") for p in SPLIT_PARTS]])
        out += "\n\neach stage's own time (p50 ms, colloquy_stage_seconds; arrival = upstream send -> this poll):\n"
        out += common.table(rows, ["phase", "stage", "arrival", "process", "send", "commit", "loop"])
    engines = [(k, r["engine_ms"]) for k, r in doc["results"].items() if r.get("engine_ms")]
    if engines:
        rows = [[k, path, *[(e.get(path, {}).get(n) or {}).get("p50") for n in ("queue", "ttft")]]
                for k, e in engines for path in ("gateway", "direct")]
        out += ("\n\ninside the engine (p50 ms, the replica's queue and first-token histograms, by the path "
                "the requests came by):\n")
        out += common.table(rows, ["phase", "path", "queue", "ttft"])
    if doc.get("goals"):
        out += "\n\ngoals:\n" + "\n".join(f"  {k}: {v['measured']} {'met' if v['met'] else 'NOT met'}"
                                          for k, v in doc["goals"].items())
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--samples", type=int, default=8, help="chats per concurrency level (at least)")
    # 8 rounds: 128 chats at 16. With 2 rounds (32 chats) the 16-chat ratio of five runs of one
    # build spread 1.51-1.97x; with 8, five runs gave 1.58-1.83x (bench/results/pipeline.md).
    p.add_argument("--min-rounds", type=int, default=8,
                   help="rounds per level at least (a round: one chat per concurrent client)")
    p.add_argument("--warmup-chats", type=int, default=12,
                   help="chats before the first phase and after each moderation restart, not measured "
                        "(each phase also drops its first round)")
    p.add_argument("--modes", default=f"{HOLD},{STREAM_FIRST}",
                   help="output moderation release modes to measure, in the first level's order")
