"""Stage scale-out: events per second of each stage at 1 and 2 replicas, and the rebalance stall.

Each replica is its own process (as in production: its own interpreter, GIL and handler state)
that builds the stage's real handler the way ``bench/stages.py`` does (``stages.build``: the same
handler inside the same transactional ``kafka_loop.StageWorker``, outputs redirected to a fresh
topic) and joins one consumer group on a fresh 6-partition input topic on the real broker.
Throughput pass at R replicas: the R workers join the group on the empty topic and hold their
partitions, then N events are produced (``stages.Run``: the same events as ``bench/stages.py``;
the producer runs alongside, in this process), and the time runs from the first send to the
group's committed offsets covering all N ("all outputs committed"). A warm-up pass at 2 replicas
(dropped) sizes N for about ``--scale-seconds``; then passes at 1 and 2 replicas alternate
``--scale-repeats`` times (median). Stall pass: a backlog for about 25 s at the two-replica rate;
replica 1 consumes it alone for 4 s after its first commit, then replica 2 joins the group (its
process already built, so only the join is timed): the stall is the longest gap between two
handled events (either replica) from the join until 5 s after replica 2 has partitions, beside
the longest gap in the 4 s before the join (the steady state); the committed offsets are sampled
every 50 ms and their longest pause is reported too. A backlog that ran out before the window
closed is flagged (that gap is idleness, not a stall).

Conversation store bytes per turn (``--store-turns``, for docs/capacity.md): that many turns of
realistic conversations (``bench/history_store.py``'s generator: messages of 30-120 characters,
answers of 200-700, the visible Turn as protobuf) bulk-loaded into the tables that
``ConversationDB.migrate()`` makes, in a fresh SQLite file and a fresh PostgreSQL database; bytes
= size after the load (SQLite files after a WAL checkpoint; ``pg_database_size`` after VACUUM
ANALYZE) minus the migrated empty store's, over the turns. Twice: with prompts quoting the two
previous turns (history_store's rows), and with every earlier turn that fits the context as the
prompt stage sends it (the oldest dropped first, counted with the served tokenizer, within
``--store-prompt-tokens``): the column ``prompt`` holds that text for every turn.

Kafka record sizes of one turn (for docs/capacity.md): the generation bridge's progress records
for a 250-token answer (served tokenizer, one token per record, cumulative text) and the
TurnEvent with and without a 4,150-character prompt, serialized with the real protobufs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import queue
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, stages
from bench.common import Record, log

NAME = "scale"
STEADY_BEFORE_JOIN_S = 4.0
AFTER_READY_S = 5.0
BACKLOG_S = 25.0  # seconds of work at the two-replica rate: the join must happen while it lasts


# -- one replica: its own process ------------------------------------------------------------
def _replica(name: str, commands: Any, replies: Any) -> None:
    """A replica process: builds the stage once, then runs one StageWorker per "run" command."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    from services.common import config, kafka_loop

    stage = stages.build(name)
    kafka = config.load(config.KafkaConfig)
    replies.put(("built", time.monotonic()))
    try:
        while True:
            cmd = commands.get()
            if cmd[0] == "exit":
                return
            _, topic_in, topic_out, group, instance = cmd
            stamps: list[float] = []
            inner = stages.redirected(stage.handler, topic_out)

            def handle(ev: Any, inner: Any = inner, stamps: list[float] = stamps) -> Any:
                out = inner(ev)
                stamps.append(time.monotonic())
                return out

            worker = kafka_loop.StageWorker(name, [topic_in], stage.message_type, handle, kafka,
                                            group_id=group, instance_id=instance)
            joined = time.monotonic()
            worker.start()
            ready = time.monotonic() if worker.wait_ready(120) else None
            replies.put(("ready", joined, ready))
            commands.get()  # "stop"
            worker.stop(30)
            replies.put(("stopped", stamps, repr(worker.error) if worker.error else None))
    finally:
        stage.close()


class Replica:
    """The parent's handle on one replica process."""

    def __init__(self, ctx: Any, name: str, index: int) -> None:
        self.name, self.index = name, index
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_replica, args=(name, self.commands, self.replies), daemon=True,
                                name=f"scale-{name}-{index}")
        self.proc.start()

    def reply(self, kind: str, timeout: float = 240.0) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.replies.get(timeout=1.0)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"{self.name} replica {self.index} exited ({self.proc.exitcode})") from None
                continue
            if msg[0] == kind:
                return tuple(msg[1:])
        raise TimeoutError(f"{self.name} replica {self.index}: no {kind!r} in {timeout} s")

    def join_group(self, run: stages.Run) -> None:
        self.commands.put(("run", run.topic_in, run.topic_out, run.group, f"scale-{self.index}"))

    def ready(self) -> tuple[float, float]:
        joined, ready = self.reply("ready", 180)
        if ready is None:
            raise TimeoutError(f"{self.name} replica {self.index}: no partitions in 120 s")
        return joined, ready

    def leave(self) -> list[float]:
        self.commands.put(("stop",))
        stamps, error = self.reply("stopped", 90)
        if error:
            raise RuntimeError(f"{self.name} replica {self.index} worker failed: {error}")
        return list(stamps)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.commands.put(("exit",))
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _events_stage(name: str) -> stages.Stage:
    """What ``stages.Run`` needs in this process (names and events; the handlers run in replicas)."""
    from colloquy.v1 import events_pb2

    if name == "moderation-output":
        return stages.Stage(name, events_pb2.GenerationProgress, lambda ev: [], stages.progress_events)
    if name == "prompt":
        return stages.Stage(name, events_pb2.TurnEvent, lambda ev: [], stages.moderated_turn_events)
    return stages.Stage(name, events_pb2.TurnEvent, lambda ev: [], stages.turn_events)


def _admin() -> Any:
    from kafka import KafkaAdminClient

    from services.common import config

    return KafkaAdminClient(**config.load(config.KafkaConfig).client_kwargs(), client_id="bench-scale")


def throughput(name: str, replicas: list[Replica], n: int, timeout: float = 300.0) -> dict[str, Any]:
    """All replicas hold partitions of a fresh topic; then N events: N / seconds to all committed."""
    run = stages.Run(_events_stage(name), n)
    admin = _admin()
    try:
        for r in replicas:
            r.join_group(run)
        for r in replicas:
            r.ready()
        time.sleep(1.0)  # the first replica's rejoin after the last one's join settles
        start = time.perf_counter()
        run.produce()
        produced = time.perf_counter() - start
        while run.committed(admin) < n:
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"{name}: {run.committed(admin)}/{n} committed after {timeout} s")
            time.sleep(0.02)
        secs = time.perf_counter() - start
        handled = [len(r.leave()) for r in replicas]
        return {"events": n, "seconds": round(secs, 2), "events_per_s": round(n / secs, 1),
                "produce_s": round(produced, 2), "handled_per_replica": handled}
    finally:
        admin.close()
        run.cleanup()


def _max_gap(stamps: list[float], lo: float, hi: float) -> tuple[float, float]:
    """Longest time without a stamp inside [lo, hi] (the window's edges count as stamps): its
    start and end."""
    inside = [lo, *(s for s in stamps if lo < s < hi), hi]
    return max(itertools.pairwise(inside), key=lambda ab: ab[1] - ab[0])


def stall(name: str, first: Replica, second: Replica, rate: float) -> dict[str, Any]:
    """Replica 2 joins while replica 1 works through a backlog: how long the stage stood still."""
    n = min(100_000, max(400, int(rate * BACKLOG_S)))
    run = stages.Run(_events_stage(name), n)
    admin = _admin()
    samples: list[tuple[float, int]] = []
    try:
        run.produce()
        first.join_group(run)
        first.ready()
        give_up = time.monotonic() + 60
        while run.committed(admin) == 0 and time.monotonic() < give_up:  # replica 1 under way
            time.sleep(0.05)
        t_end = time.monotonic() + STEADY_BEFORE_JOIN_S
        while time.monotonic() < t_end:
            samples.append((time.monotonic(), run.committed(admin)))
            time.sleep(0.05)
        second.join_group(run)
        joined, ready2 = second.ready()
        t_end = ready2 + AFTER_READY_S
        while time.monotonic() < t_end:
            samples.append((time.monotonic(), run.committed(admin)))
            time.sleep(0.05)
        done_at_window = samples[-1][1]
        s1, s2 = first.leave(), second.leave()
        stamps = sorted(s1 + s2)
        window = ready2 + AFTER_READY_S - joined
        steady_lo = joined - min(window, STEADY_BEFORE_JOIN_S)
        pauses = [b[0] - a[0] for a, b in _progress_pairs([s for s in samples if s[0] >= joined])]
        steady_pauses = [b[0] - a[0] for a, b in _progress_pairs([s for s in samples if steady_lo <= s[0] < joined])]
        gap = _max_gap(stamps, joined, ready2 + AFTER_READY_S)
        steady = _max_gap(stamps, steady_lo, joined)
        resumed = [next((round(t - joined, 2) for t in sx if t > gap[0]), None) for sx in (s1, s2)]
        return {
            "backlog": n, "join_to_partitions_s": round(ready2 - joined, 2),
            "stall_s": round(gap[1] - gap[0], 3),
            # the stall, from and to (seconds after the join), and each replica's first event after its start
            "stall_from_to_s": [round(gap[0] - joined, 2), round(gap[1] - joined, 2)],
            "resumed_after_join_s": resumed,
            "steady_max_gap_s": round(steady[1] - steady[0], 3),
            "commit_pause_s": round(max(pauses, default=0.0), 3),
            "steady_commit_pause_s": round(max(steady_pauses, default=0.0), 3),
            "handled_after_join": [sum(1 for s in s1 if s >= joined), sum(1 for s in s2 if s >= joined)],
            "committed_by_window_end": done_at_window,
            # All of it done before the window closed: the "stall" may be idleness, not a rebalance.
            "backlog_ran_out": done_at_window >= n,
        }
    finally:
        admin.close()
        run.cleanup()


def _progress_pairs(samples: list[tuple[float, int]]) -> list[tuple[tuple[float, int], tuple[float, int]]]:
    """Consecutive commit advances: (sample where the count last moved, sample where it moved next)."""
    moves = [s for i, s in enumerate(samples) if i == 0 or s[1] > samples[i - 1][1]]
    if samples and moves[-1] is not samples[-1]:
        moves.append(samples[-1])  # still paused at the window's end
    return list(itertools.pairwise(moves))


def _store_bytes(turns: int, prompt_tokens: int, pg_url: str, tmp: Path) -> dict[str, Any]:
    """Bytes per turn in SQLite and PostgreSQL, for both prompt lengths (see the module doc)."""
    from bench import history_store as hs
    from services.conversation.db import ConversationDB
    from services.tokenizer import model_files
    from services.tokenizer.domain import TextTokenizer

    tok = TextTokenizer.from_file(str(model_files.resolve_tokenizer_dir("") / model_files.TOKENIZER_FILE))

    class FullHistory(hs.Texts):
        """Prompts with every earlier turn that fits `prompt_tokens`, the oldest dropped first."""

        def prompt(self, conv: int, index: int) -> str:
            head = f"<|im_start|>system\n{hs.SYSTEM}<|im_end|>\n"
            tail = f"<|im_start|>user\n{self.message(conv, index)}<|im_end|>\n<|im_start|>assistant\n"
            turns = [f"<|im_start|>user\n{self.message(conv, j)}<|im_end|>\n"
                     f"<|im_start|>assistant\n{self.answer(conv, j)}<|im_end|>\n" for j in range(1, index)]
            while turns and len(tok.encode(head + "".join(turns) + tail)) > prompt_tokens:
                turns.pop(0)
            return head + "".join(turns) + tail

    plan = hs.make_plan(max(1, turns // 10), turns, 0, 10)
    out: dict[str, Any] = {"turns": plan.turns, "conversations": len(plan.ids)}
    for variant, texts in (("two_turns", hs.Texts()), ("context", FullHistory())):
        offsets = [0] * hs.PARTITIONS
        rows = hs.chunk_rows(plan, texts, 0, len(plan.ids), offsets, random.Random(1))
        prompt_chars = sum(len(t[4]) for t in rows[1]) / len(rows[1])
        out[variant] = {"prompt_chars_mean": round(prompt_chars),
                        "turn_proto_bytes_mean": round(sum(len(t[3]) for t in rows[1]) / len(rows[1]))}
        for kind in ("sqlite", "postgresql"):
            if kind == "sqlite":
                path = tmp / variant / "conversations.db"
                target = hs.Target("sqlite", f"sqlite:///{path}", path=path)
            else:
                name = f"colloquy_scale_{variant}"
                target = hs.Target("postgresql", pg_url.rsplit("/", 1)[0] + "/" + name,
                                   admin_url=hs._libpq(pg_url), db_name=name)
            target.create()
            try:
                db = ConversationDB(target.url)
                db.migrate()
                db.close()
                empty = _db_bytes(target)
                with target.loader() as write:
                    write(*rows)
                full = _db_bytes(target)
                out[variant][kind] = {"bytes": full - empty, "bytes_per_turn": round((full - empty) / plan.turns)}
            finally:
                target.drop()
        log(f"scale: store, {variant} prompts ({out[variant]['prompt_chars_mean']} chars): "
            f"{out[variant]['sqlite']['bytes_per_turn']} B/turn SQLite, "
            f"{out[variant]['postgresql']['bytes_per_turn']} B/turn PostgreSQL")
    return out


def _record_bytes(answer_tokens: int, prompt_chars: int) -> dict[str, Any]:
    """Kafka record sizes of one turn, from the real protobufs: the generation bridge's progress
    records for an answer of `answer_tokens` (served tokenizer; one token per record, as at
    50 tok/s with 20 ms batches; cumulative text, the prompt on the first and last), and the
    TurnEvent carrying a prompt of `prompt_chars`."""
    from colloquy.v1 import events_pb2

    from bench import history_store as hs
    from services.tokenizer import model_files
    from services.tokenizer.domain import TextTokenizer

    tok = TextTokenizer.from_file(str(model_files.resolve_tokenizer_dir("") / model_files.TOKENIZER_FILE))
    ids = tok.encode(" ".join(hs.Texts().answers[:8]))[:answer_tokens]
    texts = [tok.decode_batch([ids[:k]])[0] for k in range(1, len(ids) + 1)]
    (_, turn), = stages.turn_events(1, "replies.gateway-0")
    turn.prompt = hs.Texts().prompt(0, 20)[:prompt_chars].ljust(prompt_chars)
    light = events_pb2.TurnEvent()
    light.CopyFrom(turn)
    light.ClearField("prompt")
    sizes = []
    for k, text in enumerate(texts, 1):
        done = k == len(texts)
        msg = events_pb2.GenerationProgress(turn=turn if k == 1 or done else light, done=done, seq=k - 1,
                                            model_version="smollm2-135m-cpu-int4-gguf-f32act-09fd6d37b2dd",
                                            prompt_tokens=900, first_token_unix_ms=int(time.time() * 1000))
        msg.candidates.add(index=0, text=text, tokens=k, finish_reason=1 if done else 0)
        sizes.append(msg.ByteSize())
    empty = events_pb2.GenerationProgress(turn=light, seq=1, model_version=msg.model_version,
                                          prompt_tokens=900, first_token_unix_ms=int(time.time() * 1000))
    empty.candidates.add(index=0, text="", tokens=1)
    return {"answer_tokens": len(ids), "answer_chars": len(texts[-1]), "progress_records": len(sizes),
            "progress_bytes": sum(sizes), "progress_bytes_mean": round(sum(sizes) / len(sizes)),
            "progress_bytes_without_text": empty.ByteSize(), "turn_event_with_prompt_bytes": turn.ByteSize(),
            "turn_event_bytes": light.ByteSize()}


def _db_bytes(target: Any) -> int:
    if target.kind == "postgresql":
        import psycopg

        with psycopg.connect(target.url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])
    return sum(p.stat().st_size for p in target.path.parent.glob(target.path.name + "*"))


def _sizes(names: list[str], seconds: float) -> dict[str, int]:
    """N per stage for about `seconds` at one replica, from bench/results/stages.json's rates."""
    try:
        doc = json.loads((common.RESULTS / "stages.json").read_text(encoding="utf-8"))
        rates = {k: v["events_per_s"]["median"] for k, v in doc.get("results", {}).items()}
    except (OSError, ValueError, KeyError):
        rates = {}
    return {n: min(6000, max(200, int((rates.get(n) or 80) * seconds))) for n in names}


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [s for s in str(args.scale_stages).split(",") if s]
    sizes = _sizes(names, args.scale_seconds)
    # No stages: only the store part, added to the last run's record.
    rec = (None if names else Record.resume(NAME)) or Record(NAME, {
        "stages": names, "warmup_events": sizes, "replicas": [1, 2], "scale_seconds": args.scale_seconds,
        "method": __doc__.split("\n\n")[1].replace("\n", " ")})
    ctx = mp.get_context("spawn")
    for name in names:
        log(f"scale: {name} ({sizes[name]} events)")
        reps = [Replica(ctx, name, i) for i in (1, 2)]
        try:
            for r in reps:
                r.reply("built")
            # Warm-up (dropped): both replicas' handlers see their first events (ONNX sessions,
            # caches); its rate sizes the timed passes.
            warm = throughput(name, reps, sizes[name])
            n = min(50_000, max(200, int(warm["events_per_s"] * args.scale_seconds)))
            log(f"  warm-up: {warm['events_per_s']} events/s at 2 replicas; {n} events per pass")
            passes: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
            for _ in range(args.scale_repeats):  # alternated, so a change of load hits both counts
                for k in (1, 2):
                    passes[k].append(throughput(name, reps[:k], n))
                    log(f"  {k} replica(s): {passes[k][-1]['events_per_s']} events/s "
                        f"({passes[k][-1]['handled_per_replica']} handled)")
            one, two = (_combined(passes[k]) for k in (1, 2))
            rb = stall(name, reps[0], reps[1], two["events_per_s"])
            ran_out = "; the backlog ran out" if rb["backlog_ran_out"] else ""
            log(f"  second replica joined: stall {rb['stall_s']} s (steady max gap {rb['steady_max_gap_s']} s), "
                f"partitions after {rb['join_to_partitions_s']} s{ran_out}")
            rec.results[name] = {"1": one, "2": two, "ratio": round(two["events_per_s"] / one["events_per_s"], 2),
                                 "rebalance": rb}
        except Exception as exc:
            rec.skip(name, f"{type(exc).__name__}: {exc}")
        finally:
            for r in reps:
                r.close()
    try:
        rec.doc["records"] = _record_bytes(250, 4150)
    except Exception as exc:
        rec.skip("records", f"{type(exc).__name__}: {exc}")
    if args.store_turns:
        rec.doc["params"]["store_method"] = __doc__.split("\n\n")[2].replace("\n", " ")
        try:
            with tempfile.TemporaryDirectory(prefix="bench-scale-store-") as tmp:
                rec.doc["store"] = _store_bytes(args.store_turns, args.store_prompt_tokens, args.store_pg_url,
                                                Path(tmp))
        except Exception as exc:
            rec.skip("store", f"{type(exc).__name__}: {exc}")
    doc = rec.finish()
    text = render(doc)
    print(text)
    (common.RESULTS / f"{NAME}.md").write_text(markdown(doc), encoding="utf-8")
    return doc


def _combined(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """The median pass's figures, with every pass's rate."""
    rates = [p["events_per_s"] for p in passes]
    mid = sorted(passes, key=lambda p: p["events_per_s"])[(len(passes) - 1) // 2]
    return {**mid, "events_per_s": common.summary(rates, 1)["median"], "runs_events_per_s": rates}


def _rows(doc: dict[str, Any]) -> list[list[Any]]:
    return [[s, r["1"]["events_per_s"], r["2"]["events_per_s"], r["ratio"], r["2"]["handled_per_replica"],
             r["rebalance"]["join_to_partitions_s"],
             f"{r['rebalance']['stall_s']} (idle: backlog ran out)" if r["rebalance"].get("backlog_ran_out")
             else r["rebalance"]["stall_s"], r["rebalance"]["steady_max_gap_s"],
             r["rebalance"]["commit_pause_s"], r["rebalance"]["steady_commit_pause_s"]]
            for s, r in doc["results"].items()]


HEAD = ["stage", "events/s x1", "events/s x2", "x2 / x1", "handled by each (x2)", "join -> partitions s",
        "stall s", "steady max gap s", "commit pause s", "steady commit pause s"]


STORE_HEAD = ["prompts", "prompt chars (mean)", "Turn protobuf bytes (mean)", "SQLite bytes/turn",
              "PostgreSQL bytes/turn"]


def _store_rows(doc: dict[str, Any]) -> list[list[Any]]:
    st = doc.get("store") or {}
    labels = {"two_turns": "the 2 previous turns", "context": "every earlier turn that fits the context"}
    return [[labels[v], st[v]["prompt_chars_mean"], st[v]["turn_proto_bytes_mean"], st[v]["sqlite"]["bytes_per_turn"],
             st[v]["postgresql"]["bytes_per_turn"]] for v in labels if v in st]


def render(doc: dict[str, Any]) -> str:
    text = common.table(_rows(doc), HEAD)
    if doc.get("store"):
        text += f"\n\nconversation store, {doc['store']['turns']} turns:\n" + common.table(_store_rows(doc), STORE_HEAD)
    for what, why in doc.get("skipped", {}).items():
        text += f"\n(skipped {what}: {why})"
    return text


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    out = [f"# Stage scale-out ({doc['started']})", "",
           f"{m['cpus']} CPUs ({m['processor']}), load {m['loadavg_before'][0]} -> {m['loadavg_after'][0]}, "
           f"{doc['seconds']} s{' (noisy: the machine was busy when it started)' if doc.get('noisy') else ''}. "
           "Events per timed pass: "
           + ", ".join(f"{k} {r['1']['events']}" for k, r in doc["results"].items()) + ".", "",
           common.markdown_table(_rows(doc), HEAD), ""]
    out += [f"(skipped {what}: {why})" for what, why in doc.get("skipped", {}).items()]
    out += ["", "Method: " + doc["params"]["method"], ""]
    rec = doc.get("records")
    if rec:
        out += ["## Kafka record sizes of one turn (real protobufs)", "",
                f"An answer of {rec['answer_tokens']} tokens ({rec['answer_chars']} characters) as progress records of "
                f"one token each (cumulative text): {rec['progress_records']} records, {rec['progress_bytes']:,} bytes "
                f"(mean {rec['progress_bytes_mean']}, of which {rec['progress_bytes_without_text']} without text); "
                f"TurnEvent {rec['turn_event_bytes']} bytes, "
                f"with a prompt {rec['turn_event_with_prompt_bytes']:,}.", ""]
    if doc.get("store"):
        out += [f"## Conversation store: bytes per turn ({doc['store']['turns']} turns, "
                f"{doc['store']['conversations']} conversations)", "",
                common.markdown_table(_store_rows(doc), STORE_HEAD), "",
                "Method: " + doc["params"].get("store_method", ""), ""]
    return "\n".join(out)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale-stages", default=",".join(stages.STAGES))
    p.add_argument("--scale-seconds", type=float, default=5.0,
                   help="events per throughput pass: about this many seconds at one replica")
    p.add_argument("--scale-repeats", type=int, default=3, help="timed passes at each replica count")
    p.add_argument("--store-turns", type=int, default=10_000, help="turns loaded to size the store (0: skip)")
    p.add_argument("--store-prompt-tokens", type=int, default=1792,
                   help="a full-history prompt's budget: the 2048-token slot less a 256-token answer")
    p.add_argument("--store-pg-url", default=os.environ.get(
        "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:55432/postgres"),
                   help="a PostgreSQL where scratch databases may be created and dropped")


if __name__ == "__main__":  # python -m bench.scale: the same as python -m bench scale
    import sys

    from bench.__main__ import main

    raise SystemExit(main([NAME, *sys.argv[1:]]))

