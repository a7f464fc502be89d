"""Stage throughput: events per second each non-generation stage sustains, and where its time goes.

Each stage runs in this process as the service runs it: the same handler (tokenizer, moderation
input/output, prompt) inside the same transactional ``kafka_loop.StageWorker``, on the real broker.
Its input is a fresh topic (6 partitions, like the real ones) holding N events produced *before*
the worker starts; its outputs are redirected to a fresh topic, so nothing reaches the real
pipeline. Timing runs from the moment the consumer has its partitions to the moment the group's
committed offsets cover all N events (outputs and offsets commit in one transaction, so this is
"all outputs committed"). Events: TurnEvents of new conversations (realistic chat messages) for
tokenizer, moderation input and prompt; for moderation output, GenerationProgress batches of
answers streaming in (cumulative text, a batch every ~4 tokens, the last one done). Then the
slowest stage runs again under py-spy (every thread, so Kafka I/O shows) or, without py-spy,
cProfile (the worker thread); the top functions go in the JSON.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import os
import pstats
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common
from bench.common import Record, log

NAME = "stages"
STAGES = ("tokenizer", "moderation-input", "moderation-output", "prompt")

ANSWER = ("Rome is a wonderful city for food and museums. Start with the Colosseum and the Roman "
          "Forum, then spend a morning in the Vatican Museums and the Sistine Chapel. In the evening, "
          "walk through Trastevere and try cacio e pepe and supplì. Book tickets in advance.")


@dataclasses.dataclass
class Stage:
    name: str
    message_type: Any
    handler: Callable[[Any], Any]
    events: Callable[[int, str], list[tuple[str, Any]]]  # (key, message) pairs
    close: Callable[[], None] = lambda: None


def _messages() -> list[str]:
    from bench.conversation import MESSAGES

    return list(common.QUESTIONS) + MESSAGES


def turn_events(n: int, reply_topic: str) -> list[tuple[str, Any]]:
    from colloquy.v1 import common_pb2, events_pb2

    msgs = _messages()
    out = []
    for i in range(n):
        conv = str(uuid.uuid4())
        out.append((conv, events_pb2.TurnEvent(
            request_id=f"bench-{uuid.uuid4().hex}", conversation_id=conv, user_id="dev",
            message=msgs[i % len(msgs)], sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=64),
            reply_topic=reply_topic, accepted_unix_ms=int(time.time() * 1000), message_tokens=12)))
    return out


def moderated_turn_events(n: int, reply_topic: str) -> list[tuple[str, Any]]:
    """``turn_events`` as they reach the prompt stage (chat.moderated): with input moderation's
    decision, allow, which that stage requires (it refuses a turn without one)."""
    from colloquy.v1 import common_pb2

    out = turn_events(n, reply_topic)
    for _, ev in out:
        ev.input_moderation.action = common_pb2.MODERATION_ACTION_ALLOW
    return out


def progress_events(n: int, reply_topic: str) -> list[tuple[str, Any]]:
    """Answers streaming in: per answer, cumulative text every ~16 characters, the last batch done."""
    from colloquy.v1 import events_pb2, generation_pb2

    msgs = _messages()
    steps = [*range(16, len(ANSWER), 16), len(ANSWER)]
    out: list[tuple[str, Any]] = []
    a = 0
    while len(out) < n:
        conv = str(uuid.uuid4())
        turn = events_pb2.TurnEvent(request_id=f"bench-{uuid.uuid4().hex}", conversation_id=conv, user_id="dev",
                                    message=msgs[a % len(msgs)], reply_topic=reply_topic, turn_index=1,
                                    accepted_unix_ms=int(time.time() * 1000))
        for seq, end in enumerate(steps):
            done = end == len(ANSWER) or len(out) == n - 1
            out.append((conv, events_pb2.GenerationProgress(
                turn=turn, seq=seq, done=done, model_version="bench", prompt_tokens=40,
                candidates=[events_pb2.CandidateText(
                    index=0, text=ANSWER[:end], tokens=end // 4,
                    finish_reason=generation_pb2.FINISH_REASON_STOP if done else 0)])))
            if done:
                break
        a += 1
    return out


def build(name: str) -> Stage:
    """The stage's real handler, built the way its service's __main__ builds it."""
    from colloquy.v1 import events_pb2

    from services.common import config

    if name == "tokenizer":
        from services.tokenizer import model_files
        from services.tokenizer.domain import TextTokenizer
        from services.tokenizer.worker import make_handler

        tok = TextTokenizer.from_file(str(model_files.resolve_tokenizer_dir("") / model_files.TOKENIZER_FILE))
        return Stage(name, events_pb2.TurnEvent, make_handler(tok, "bench.unused"), turn_events)
    if name.startswith("moderation"):
        from services.moderation.__main__ import load_moderator
        from services.moderation.config import ModerationConfig
        from services.moderation.worker import InputStage, OutputStage

        cfg = config.load(ModerationConfig)
        moderator = load_moderator(cfg)
        if name == "moderation-input":
            return Stage(name, events_pb2.TurnEvent, InputStage(moderator).handle, turn_events)
        return Stage(name, events_pb2.GenerationProgress,
                     OutputStage(moderator, cfg.chunk_min_chars, cfg.chunk_max_chars,
                                 first_chars=cfg.chunk_first_chars).handle, progress_events)
    if name == "prompt":
        import tempfile

        from services.common import topics
        from services.conversation.db import ConversationDB
        from services.conversation.reader import StoreReader
        from services.conversation.worker import Materializer
        from services.prompt import templates as templates_mod
        from services.prompt.config import PromptConfig
        from services.prompt.domain import Assembler
        from services.prompt.pending import TurnTracker
        from services.prompt.worker import make_handler as prompt_handler
        from services.tokenizer import model_files
        from services.tokenizer.domain import TextTokenizer

        pcfg = config.load(PromptConfig)
        path = model_files.resolve_tokenizer_dir(pcfg.tokenizer_path)
        tok = TextTokenizer.from_file(str(path / model_files.TOKENIZER_FILE))
        assembler = Assembler(tok, model_files.context_tokens(path, pcfg.context_tokens))
        # The history the stage reads: a store of its own (a temporary SQLite file) that a
        # materializer in this process fills from conversation.turns, as the service would read.
        kafka = config.load(config.KafkaConfig)
        group = f"bench-conversation-{os.getpid()}"
        store_dir = tempfile.TemporaryDirectory(prefix="colloquy-bench-store-")
        db = ConversationDB(f"sqlite:///{store_dir.name}/conversations.db")
        materializer = Materializer(db, kafka, topic=topics.CONVERSATION_TURNS.name, group_id=group,
                                    instance_id=group).start()
        if not materializer.wait_ready(300):
            raise RuntimeError(f"the bench's conversation store never caught up: {materializer.error!r}")
        reader = StoreReader(db, kafka, topic=topics.CONVERSATION_TURNS.name, group_id=group)
        tracker = TurnTracker(ttl_ms=int(pcfg.pending_ttl_s * 1000))
        handler = prompt_handler(assembler, templates_mod.load_file(pcfg.templates_file), tracker, reader, pcfg)

        def close() -> None:
            reader.stop()
            materializer.stop()
            db.close()
            store_dir.cleanup()

        return Stage(name, events_pb2.TurnEvent, handler, moderated_turn_events, close=close)
    raise ValueError(f"unknown stage {name!r}; one of {', '.join(STAGES)}")


def redirected(handler: Callable[[Any], Any], topic: str) -> Callable[[Any], list[Any]]:
    """The handler with every output sent to ``topic`` (the real topics stay untouched)."""

    def handle(ev: Any) -> list[Any]:
        return [dataclasses.replace(o, topic=topic, partition=None) for o in (handler(ev) or [])]

    return handle


class Run:
    """One timed pass of a stage over N pre-produced events."""

    def __init__(self, stage: Stage, n: int) -> None:
        from services.common import config, topics

        self.stage, self.n = stage, n
        self.kafka = config.load(config.KafkaConfig)
        tag = f"bench.{stage.name}.{uuid.uuid4().hex[:8]}"
        self.topic_in, self.topic_out, self.group = f"{tag}.in", f"{tag}.out", f"{tag}.group"
        topics.ensure_topics(self.kafka.bootstrap_servers, [
            topics.Topic(self.topic_in, 6, topics.STREAM), topics.Topic(self.topic_out, 6, topics.STREAM)],
            kafka=self.kafka)

    def produce(self) -> None:
        from services.common import events, kafka_loop

        producer = kafka_loop.make_producer(self.kafka, "bench-feeder")
        try:
            for key, msg in self.stage.events(self.n, self.topic_out):
                out = events.OutEvent(self.topic_in, key, msg, request_id=getattr(msg, "request_id", ""))
                producer.send(out.topic, key=key.encode(), value=msg.SerializeToString(), headers=out.headers())
            producer.flush()
        finally:
            producer.close(timeout=10)

    def committed(self, admin: Any) -> int:
        offsets = admin.list_group_offsets(self.group).get(self.group, {})
        return sum(o.offset for tp, o in offsets.items() if tp.topic == self.topic_in and o.offset > 0)

    def time(self, wrap: Callable[[Callable[[], None]], Callable[[], None]] | None = None,
             timeout: float = 600.0) -> float:
        """Seconds from partitions assigned to all N offsets committed."""
        import threading

        from kafka import KafkaAdminClient

        from services.common import kafka_loop

        worker = kafka_loop.StageWorker(self.stage.name, [self.topic_in], self.stage.message_type,
                                        redirected(self.stage.handler, self.topic_out), self.kafka,
                                        group_id=self.group, instance_id="bench")
        target = wrap(worker._guarded) if wrap else worker._guarded
        worker._thread = threading.Thread(target=target, name=f"{self.stage.name}-worker", daemon=True)
        admin = KafkaAdminClient(**self.kafka.client_kwargs(), client_id="bench-offsets")
        try:
            worker._thread.start()
            if not worker.wait_ready(120):
                raise TimeoutError(f"{self.stage.name}: no partitions after 120 s")
            start = time.perf_counter()
            deadline = start + timeout
            while self.committed(admin) < self.n:
                if worker.error is not None:
                    raise RuntimeError(f"{self.stage.name} worker died: {worker.error!r}")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{self.stage.name}: {self.committed(admin)}/{self.n} after {timeout} s")
                time.sleep(0.02)
            return time.perf_counter() - start
        finally:
            worker.stop(30)
            admin.close()

    def cleanup(self) -> None:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(**self.kafka.client_kwargs(), client_id="bench-cleanup")
        try:
            admin.delete_topics([self.topic_in, self.topic_out])
            admin.delete_groups([self.group])
        except Exception as exc:  # leftovers are harmless (short retention); say so and go on
            log(f"stages: cleanup of {self.topic_in}: {exc}")
        finally:
            admin.close()


def measure(stage: Stage, n: int, repeats: int) -> dict[str, Any]:
    rates = []
    for r in range(repeats + 1):
        run = Run(stage, n if r else max(8, n // 8))  # round 0: a small warm-up, dropped
        try:
            run.produce()
            secs = run.time()
        finally:
            run.cleanup()
        if r:
            rates.append(n / secs)
    return {"events": n, "events_per_s": common.summary(rates, 1)}


def profile(stage: Stage, n: int, top: int) -> dict[str, Any]:
    """Where the slowest stage's time goes: py-spy over every thread, else cProfile of the worker."""
    run = Run(stage, n)
    try:
        run.produce()
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if Path(spy).exists():
            raw = common.RESULTS / f"stages-{stage.name}.pyspy.txt"
            raw.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen([spy, "record", "--pid", str(os.getpid()), "--rate", "200", "--format", "raw",
                                     "--nonblocking", "-o", str(raw)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            time.sleep(1.0)  # py-spy attaches
            try:
                secs = run.time()
            finally:
                proc.send_signal(2)  # SIGINT: py-spy writes what it sampled
                _, err = proc.communicate(timeout=60)
            if raw.is_file() and raw.stat().st_size:
                return {"tool": "py-spy", "seconds": round(secs, 2), "events": n,
                        "raw": raw.name, **collapsed_top(raw.read_text(), top)}
            log(f"stages: py-spy gave nothing ({err.decode(errors='replace')[-300:]}); using cProfile")
        prof = cProfile.Profile()
        run2 = Run(stage, n)
        try:
            run2.produce()
            secs = run2.time(wrap=lambda fn: lambda: prof.runcall(fn))
        finally:
            run2.cleanup()
        stats = pstats.Stats(prof)
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)  # type: ignore[attr-defined]
        return {"tool": "cProfile (worker thread)", "seconds": round(secs, 2), "events": n,
                "top_cumulative": [{"function": f"{Path(f).name}:{ln} {fn}", "calls": nc,
                                    "self_s": round(tt, 3), "cumulative_s": round(ct, 3)}
                                   for (f, ln, fn), (_cc, nc, tt, ct, _) in rows[:top]]}
    finally:
        run.cleanup()


# Stacks of this process that are the benchmark itself, not the stage: the main thread polling
# committed offsets (its admin client's I/O shows up under Run.committed too).
OWN_FRAMES = ("Run.time (", "Run.committed (", "main (bench/__main__.py")


def collapsed_top(text: str, top: int, drop: tuple[str, ...] = OWN_FRAMES) -> dict[str, Any]:
    """Top functions of py-spy's collapsed stacks: by own samples (leaf) and by inclusive samples.

    Stacks with a frame from ``drop`` (the benchmark's own thread) are left out.
    """
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = dropped = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        if any(d in stack for d in drop):
            dropped += n
            continue
        total += n
        frames = [f.strip() for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    pct = lambda c: round(100 * c / total, 1) if total else 0.0  # noqa: E731
    return {"samples": total, "benchmark_thread_samples_left_out": dropped,
            "top_self": [{"function": f, "pct": pct(c)} for f, c in own.most_common(top)],
            "top_inclusive": [{"function": f, "pct": pct(c)} for f, c in incl.most_common(top * 3)
                              if not f.startswith(("<module>", "_bootstrap", "run (threading"))][:top]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [s for s in str(args.stages).split(",") if s]
    rec = Record(NAME, {"events": args.events, "repeats": args.stage_repeats, "stages": names,
                        "max_poll_records": os.environ.get("KAFKA_MAX_POLL_RECORDS", "64 (default)"),
                        "method": __doc__.split("\n\n")[1].replace("\n", " ")}, settle_s=common.SETTLE_S)
    built: dict[str, Stage] = {}
    for name in names:
        log(f"stages: {name}")
        try:
            built[name] = build(name)
            rec.results[name] = measure(built[name], args.events, args.stage_repeats)
            log(f"  {name}: {rec.results[name]['events_per_s']['median']} events/s")
        except Exception as exc:
            rec.skip(name, f"{type(exc).__name__}: {exc}")
    if rec.results and args.profile_events:
        slowest = min(rec.results, key=lambda s: rec.results[s]["events_per_s"]["median"] or 0)
        log(f"stages: profiling the slowest, {slowest}")
        try:
            rec.doc["profile"] = {"stage": slowest, **profile(built[slowest], args.profile_events, args.top)}
        except Exception as exc:
            rec.skip("profile", f"{type(exc).__name__}: {exc}")
    for stage in built.values():
        stage.close()
    doc = rec.finish()
    print(render(doc))
    return doc


def render(doc: dict[str, Any]) -> str:
    body = [[s, r["events"], r["events_per_s"]["median"], r["events_per_s"]["min"]] for s, r in doc["results"].items()]
    text = common.table(body, ["stage", "events", "events/s p50", "min"])
    prof = doc.get("profile")
    if prof:
        key = "top_self" if "top_self" in prof else "top_cumulative"
        text += f"\nwhere {prof['stage']}'s time goes ({prof['tool']}, {key}):"
        for row in prof.get(key, [])[:8]:
            share = f"{row['pct']}%" if "pct" in row else f"{row['cumulative_s']} s"
            text += f"\n  {share:>8}  {row['function']}"
    for what, why in doc.get("skipped", {}).items():
        text += f"\n(skipped {what}: {why})"
    return text


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--events", type=int, default=400, help="events per timed pass")
    p.add_argument("--stage-repeats", type=int, default=2)
    p.add_argument("--profile-events", type=int, default=300, help="events in the profiled pass (0: no profile)")
    p.add_argument("--top", type=int, default=15)
