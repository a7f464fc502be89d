"""Gated promotion end to end (issue 21 item 3): two automatic canaries on the running stack.

``python -m bench canary`` (``make bench BENCH=canary``): the whole stack serving the tiny model
from a registry of its own, Debian's Prometheus scraping every service (deploy/prometheus's jobs,
the stack's addresses, every second), chat traffic with simulated thumbs on the side, and
:func:`rlhf.canary.run_canary` twice:

1. a *good* candidate: the stable version's own files published under a new name (equal by
   construction): the canary must be promoted;
2. a deliberately *bad* candidate: a random model of the same family 12 layers deep and 768 wide
   (about 140 M parameters, the stable tiny model has 2 layers, 64 wide), answering the same
   prompts several times slower: the canary must be rolled back on time to first token.

Neither candidate came out of the RLHF job, so the bench writes the quality-gate and replay records
the job would have written (``passed``: both are forced through to the canary; a real child gets them
from rlhf.export and rlhf.replay). The tiny models' answers are noise: the simulated users' thumbs
(the labelers' rule score of the answer above the stable version's median) are computed, counted and
checked, but do not tell good from bad here. Results: bench/results/canary.md and canary.json, with
the log of both watches and the registry's canary log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import common

NAME = "canary"
SLOW_CONFIG = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64}
TOPICS = ["a lighthouse", "rainbows", "cooking", "the sea", "bicycles", "volcanoes", "bread", "owls",
          "trains", "gardens", "the moon", "chess"]
FORMS = ["Tell me something about {t}.", "Write two sentences about {t}.", "What should I know about {t}?",
         "Explain {t} to a child."]


def add_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--canary-percent", type=int, default=50,
                       help="share of conversations the candidate answers during each canary (1..99)")
    group.add_argument("--canary-watch-s", type=float, default=90.0, help="seconds each canary is watched")
    group.add_argument("--canary-clients", type=int, default=3, help="concurrent simulated users")


def build_slow_model() -> Path:
    """The bad candidate's ONNX model (cached under <build>/canary-slow): tiny's recipe, wider and deeper."""
    from model.paths import build_dir
    from model.steps import run_step
    from model.tiny import SEED, TINY_CONFIG, tokenizer_dir

    config = {**TINY_CONFIG, **SLOW_CONFIG}
    tok = tokenizer_dir()

    def build(out: Path) -> Path:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from model.hf_export import copy_tokenizer, save_checkpoint
        from model.onnx_export import run_builder

        torch.manual_seed(SEED)
        model = LlamaForCausalLM(LlamaConfig(**config)).eval()
        with tempfile.TemporaryDirectory(prefix="canary-slow-hf-") as hf_tmp:
            save_checkpoint(model, Path(hf_tmp))
            copy_tokenizer(tok, Path(hf_tmp))
            run_builder(Path(hf_tmp), out, "fp32", "cpu", {}, in_process=True)
        return out

    root = build_dir()
    run_step("canary-slow", root / "canary-slow", {"config": config, "seed": SEED}, build)
    return root / "canary-slow"


def publish_candidates(reg: Any, tiny: Path, slow: Path, stamp: str) -> tuple[str, str, str]:
    """stable (current), good (stable's files), bad (the slow model); the candidates carry the
    gate and replay records that make them eligible (written by this bench, see the docstring)."""
    forced = {"passed": True, "note": "written by bench/canary.py to force this candidate to a canary"}
    stable, good, bad = f"tiny-stable-{stamp}", f"tiny-good-{stamp}", f"slow-bad-{stamp}"
    reg.publish(tiny, stable, source="tiny-random", precision="fp32", execution_provider="cpu")
    reg.set_current("generation", stable, reason="bench canary: stable version")
    for version, files in ((good, tiny), (bad, slow)):
        reg.publish(files, version, source="tiny-random", precision="fp32", execution_provider="cpu",
                    parent_version=stable, quality={"gate": dict(forced)}, training={"replay": dict(forced)})
    return stable, good, bad


class Traffic:
    """Simulated users: a new conversation per chat (the canary share is per conversation), then a
    thumbs up or down by the labelers' rule, until stopped."""

    def __init__(self, gateway: str, clients: int, threshold: float) -> None:
        self.gateway, self.clients, self.threshold = gateway, clients, threshold
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.chats: dict[str, int] = {}
        self.failures: list[str] = []
        self.unrated: dict[str, int] = {}
        self.threads: list[threading.Thread] = []

    def chat(self, stub: Any, question: str) -> tuple[str, int, str, str]:
        from colloquy.v1 import chat_pb2, common_pb2

        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=12)
        events = list(stub.Chat(chat_pb2.ChatRequest(message=question, sampling=sampling),
                                metadata=common.DEV_KEY, timeout=120))
        started = events[0].started
        text = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta" and e.delta.index == 0)
        version = next((e.done.model_version for e in events if e.WhichOneof("event") == "done"), "")
        return started.conversation_id, started.turn_index, text, version

    def user(self, seed: int) -> None:
        import grpc
        from colloquy.v1 import chat_pb2, chat_pb2_grpc

        from rlhf.preference import score

        rng = random.Random(seed)
        with grpc.insecure_channel(self.gateway) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            while not self.stop.is_set():
                question = rng.choice(FORMS).format(t=rng.choice(TOPICS)) + f" ({rng.randrange(10**6)})"
                try:
                    conv, turn, text, version = self.chat(stub, question)
                except grpc.RpcError as exc:
                    with self.lock:
                        self.failures.append(f"{exc.code().name}: {exc.details()}")
                    time.sleep(1)
                    continue
                with self.lock:  # no version: refused before generation (input moderation)
                    key = version or "none (refused before generation)"
                    self.chats[key] = self.chats.get(key, 0) + 1
                up = score(question, text) >= self.threshold
                try:
                    stub.SubmitFeedback(chat_pb2.SubmitFeedbackRequest(
                        conversation_id=conv, turn_index=turn, rating=chat_pb2.Rating(thumbs_up=up)),
                        metadata=common.DEV_KEY, timeout=30)
                except grpc.RpcError as exc:  # a turn moderation refused has nothing to rate
                    with self.lock:
                        self.unrated[exc.code().name] = self.unrated.get(exc.code().name, 0) + 1

    def __enter__(self) -> Traffic:
        self.threads = [threading.Thread(target=self.user, args=(k,), daemon=True) for k in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(150)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"chats_by_version": dict(self.chats), "failed_chats": len(self.failures),
                    "failure_examples": self.failures[:3], "ratings_refused": dict(self.unrated)}


def stable_threshold(gateway: str, n: int = 12) -> tuple[float, list[float]]:
    """The thumbs threshold: the median rule score of the stable version's answers to n questions."""
    import grpc
    from colloquy.v1 import chat_pb2_grpc

    from rlhf.preference import score

    traffic = Traffic(gateway, 0, 0.0)
    rng = random.Random(99)
    scores = []
    with grpc.insecure_channel(gateway) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for _ in range(n):
            question = rng.choice(FORMS).format(t=rng.choice(TOPICS)) + f" ({rng.randrange(10**6)})"
            scores.append(score(question, traffic.chat(stub, question)[2]))
    return statistics.median(scores), scores


def scrape_configs(s: Any, replica_port: int) -> list[dict[str, Any]]:
    from tests.observability.promstack import local_config, local_metrics_ports, rewrite_targets

    addresses: dict[int, str | None] = {port: f"127.0.0.1:{s.metrics_ports[name]}"
                                        for name, port in local_metrics_ports().items() if name in s.metrics_ports}
    addresses.update({9110: f"127.0.0.1:{replica_port}", 9111: None, 9091: None})
    for port in local_metrics_ports().values():
        addresses.setdefault(port, None)
    return rewrite_targets(local_config(), addresses)


class LogTail(logging.Handler):
    """Keeps rlhf.canary's log lines (the watch's looks and decisions) for the results."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{time.strftime('%H:%M:%S', time.gmtime(record.created))} {record.getMessage()}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from devtools.procs import free_port
    from model.registry import Registry
    from model.tiny import cached_tiny_model
    from rlhf import canary
    from rlhf.config import load_canary_config
    from tests.observability.promstack import Prometheus

    if not 1 <= args.canary_percent <= 99:
        raise SystemExit(f"--canary-percent must be 1..99, not {args.canary_percent}")
    if not args.canary_watch_s > 0 or args.canary_clients < 1:
        raise SystemExit("--canary-watch-s must be > 0 and --canary-clients >= 1")
    common.log("canary: building the tiny model and the slow bad candidate (cached after the first run)")
    tiny, slow = cached_tiny_model(), build_slow_model()
    workdir = Path(tempfile.mkdtemp(prefix="colloquy-bench-canary-"))
    root = workdir / "registry"
    reg = Registry(root)
    stable, good, bad = publish_candidates(reg, tiny, slow, time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
    os.environ["COLLOQUY_MODEL_REGISTRY"] = str(root)  # the announced rollout's registry (this process)
    replica_port = free_port()
    cfg = load_canary_config(prometheus_url="http://placeholder", warmup_s=15.0, watch_s=args.canary_watch_s,
                             interval_s=10.0, extensions=1, min_requests=20, min_ratings=10)
    tail = LogTail()
    logging.getLogger("rlhf.canary").addHandler(tail)
    logging.getLogger("rlhf.canary").setLevel(logging.INFO)
    record = common.Record(NAME, {"percent": args.canary_percent, "watch_s": args.canary_watch_s,
                                  "clients": args.canary_clients, "stable": stable, "good": good, "bad": bad,
                                  "settings": {k: v for k, v in vars(cfg).items() if k != "prometheus_url"}})
    env = {"generation": {"COLLOQUY_MODEL_REGISTRY": str(root), "GENERATION_REPLICA_METRICS_PORT": str(replica_port)},
           # the simulated users share one key: its rate limit is not what is measured here
           "gateway": {"CHAT_USER_RATE_PER_MINUTE": "6000", "CHAT_USER_BURST": "100"}}
    with common.stack(extra_env=env) as s:
        prom = Prometheus(workdir, scrape_configs(s, replica_port), scrape_s=1.0)
        try:
            deadline = time.monotonic() + 60
            while len(prom.query("up == 1")) < 3 and time.monotonic() < deadline:
                time.sleep(0.5)
            cfg = load_canary_config(**{**vars(cfg), "prometheus_url": f"http://{prom.address}"})
            threshold, warm = stable_threshold(s.gateway)
            record.results["thumbs_threshold"] = {"median_rule_score": threshold, "stable_scores": warm}
            for name, version in (("good", good), ("bad", bad)):
                common.log(f"canary: {name} candidate {version} at {args.canary_percent}% "
                           f"for {args.canary_watch_s:.0f} s")
                start = len(tail.lines)
                t0 = time.monotonic()
                with Traffic(s.gateway, args.canary_clients, threshold) as traffic:
                    entry = canary.gated_canary(reg, "generation", version, args.canary_percent, cfg)
                record.results[name] = {"entry": entry, "log": tail.lines[start:], "traffic": traffic.snapshot(),
                                        "wall_s": round(time.monotonic() - t0, 1),
                                        "serving_after": reg.current("generation"),
                                        "canary_after": reg.canary("generation")}
                common.log(f"canary: {name}: {entry['outcome']} ({'; '.join(entry['reasons'])})")
            record.results["canary_log"] = reg.canary_log("generation")
            record.results["pointer_events"] = (reg.pointer("generation") or {}).get("events", [])
        finally:
            prom.stop()
    doc = record.finish()
    write_markdown(doc)
    return doc


def write_markdown(doc: dict[str, Any]) -> Path:
    p, r = doc["params"], doc["results"]
    lines = [
        "# Gated canary: one automatic promotion, one automatic rollback",
        "",
        "`make bench BENCH=canary` (bench/canary.py): the whole stack serving the tiny model from a registry",
        "of its own, Debian's Prometheus scraping every service each second, simulated users chatting",
        f"({p['clients']} at once, a new conversation per chat) and rating each answer, and",
        f"`rlhf.canary.gated_canary` run twice at {p['percent']}% of conversations: 15 s of warm-up not judged,",
        f"then watched {p['watch_s']:.0f} s (a look every 10 s; 20 requests and 10 ratings per version before a",
        "check counts; a rate fails only past its limit beyond chance at 95%). The tiny",
        "model is used because the real one answers a few chats a minute on 2 shared cores.",
        "",
        f"- stable: `{p['stable']}` (tiny random model, 2 layers, 64 wide)",
        f"- good candidate: `{p['good']}`: the stable version's files under a new name",
        f"- bad candidate: `{p['bad']}`: a random model 12 layers deep and 768 wide (slow on purpose)",
        "",
        "Both candidates carry quality-gate and replay records written by the bench (`passed`), so they",
        "reach the canary the way a child of the RLHF job that passed both would. Thumbs: up when the",
        "labelers' rule scores the answer at or above the median of the stable version's warm-up answers",
        f"({r['thumbs_threshold']['median_rule_score']:.3f}); on noise answers they do not separate the versions.",
        "`passed` None: past the limit by less than chance explains (the watch would wait for more samples).",
        "",
        f"Run {doc['started']}, {doc['seconds']} s, 2 shared cores, load {doc['machine']['loadavg_before'][0]} -> "
        f"{doc['machine']['loadavg_after'][0]}.",
        "",
    ]
    for name in ("good", "bad"):
        run_ = r[name]
        e = run_["entry"]
        lines += [f"## The {name} candidate: {e['outcome']}", "",
                  f"Watched {e.get('watched_s')} s ({e.get('looks')} looks), wall {run_['wall_s']} s; "
                  f"serving afterwards: `{run_['serving_after']}`, canary afterwards: {run_['canary_after']}; "
                  f"chats answered by version: {run_['traffic']['chats_by_version']}, "
                  f"failed chats: {run_['traffic']['failed_chats']}; ratings refused (a turn moderation refused "
                  f"has nothing to rate): {run_['traffic']['ratings_refused']}.", "",
                  "| check | canary | stable | limit | samples (canary/stable) | passed |",
                  "|---|---|---|---|---|---|"]
        for c in e.get("checks", []):
            def f(v: Any) -> str:
                return "-" if v is None else f"{v:.4g}"
            lines.append(f"| {c['name']} | {f(c['canary'])} | {f(c['stable'])} | {f(c['limit'])} | "
                         f"{c['samples'][0]:.0f}/{c['samples'][1]:.0f} | {c['passed']} |")
        lines += ["", "Reasons recorded in the registry:", ""] + [f"- {x}" for x in e["reasons"]]
        lines += ["", "The controller's log:", "", "```", *run_["log"], "```", ""]
    lines += ["## The registry's canary log (`current/generation.canary-log`, also in each manifest)", "",
              "```json", json.dumps([{k: v for k, v in e.items() if k not in ("checks", "canary_stats", "stable_stats")}
                                     for e in r["canary_log"]], indent=2), "```", "",
              "Pointer events (`current/generation.json`):", "", "```json",
              json.dumps(r["pointer_events"], indent=2), "```", ""]
    path = common.RESULTS / "canary.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
