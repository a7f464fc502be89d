"""Shared helpers of the benchmark suite: timing, percentiles, tables, JSON/PNG results, the stack.

Every benchmark module exposes ``run(args) -> dict`` and uses these so their JSON looks alike:
``{"benchmark", "started", "seconds", "machine": {loadavg_before/after...}, "params", "results"}``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("BENCH_RESULTS") or ROOT / "bench" / "results")  # smoke runs point elsewhere
for _p in (str(ROOT), str(ROOT / "build" / "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DEV_KEY = [("authorization", "Bearer colloquy-dev-key")]
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
# Above this 1-minute load average per CPU the figures are called noisy in the report.
NOISY_LOAD_PER_CPU = 1.5
# Seconds a benchmark waits for the load left by the previous one (its stack, say) to fall.
SETTLE_S = 90.0
STACK_LOCK = "/tmp/colloquy-stack.lock"

# Prompts every contender gets. Questions with long answers, so that the deployment (which stops
# at the end-of-turn token; the in-process contenders are pinned to exactly max_tokens) generates
# about as many tokens as the others.
QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain in simple words how a rainbow forms, step by step.",
    "Give me five tips for learning to cook, with a sentence on each.",
]


def log(msg: str) -> None:
    """Progress lines go to stderr so stdout keeps the tables."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (k - lo))


def summary(values: Sequence[float], digits: int = 2) -> dict[str, Any]:
    """Median, p99, min, max and count: what every figure in the JSON carries."""
    if not values:
        return {"n": 0, "median": None, "p99": None, "min": None, "max": None}
    return {"n": len(values), "median": round(statistics.median(values), digits),
            "p99": round(percentile(values, 99), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def token_clock(stamps: list[float]) -> Any:
    """A transformers streamer that appends perf_counter() at each put(): first the prompt, then
    one per generated token (transformers is imported here, only by the benchmarks that use it)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def put(self, value: Any) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    return Clock()


class Record:
    """One benchmark's result document; `finish()` stamps the end load and writes the JSON."""

    def __init__(self, name: str, params: dict[str, Any], settle_s: float = 0.0) -> None:
        self.name = name
        waited = settle(settle_s) if settle_s else 0.0
        self.doc: dict[str, Any] = {
            "benchmark": name,
            "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count(),
                        "loadavg_before": loadavg()},
            "params": params,
            "results": {},
            "skipped": {},
        }
        if waited:
            self.doc["machine"]["settled_s"] = waited
        self._t0 = time.perf_counter()

    @classmethod
    def resume(cls, name: str, out_dir: Path | None = None) -> Record | None:
        """The record of an earlier run (``--resume``: rerun only its missing parts), or None."""
        path = (out_dir or RESULTS) / f"{name}.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        rec = cls(name, doc.get("params", {}))
        rec.doc = doc
        rec.doc.setdefault("skipped", {})
        rec.doc["resumed"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        rec._t0 -= float(doc.get("seconds") or 0)
        return rec

    def unskip(self, what: str) -> None:
        self.doc["skipped"].pop(what, None)

    @property
    def results(self) -> dict[str, Any]:
        return self.doc["results"]

    def skip(self, what: str, reason: str) -> None:
        """A contender that could not run: said in the JSON and the report, never a failure."""
        log(f"{self.name}: skipping {what}: {reason}")
        self.doc["skipped"][what] = reason

    def finish(self, out_dir: Path | None = None) -> dict[str, Any]:
        out_dir = out_dir or RESULTS  # read at call time: a smoke test points RESULTS elsewhere
        self.doc["machine"]["loadavg_after"] = loadavg()
        self.doc["seconds"] = round(time.perf_counter() - self._t0, 1)
        self.doc["noisy"] = is_noisy(self.doc)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.name}.json"
        path.write_text(json.dumps(self.doc, indent=2, default=str) + "\n", encoding="utf-8")
        log(f"{self.name}: wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
            f"(load {self.doc['machine']['loadavg_before'][0]} -> {self.doc['machine']['loadavg_after'][0]}, "
            f"{self.doc['seconds']} s)")
        return self.doc


def is_noisy(doc: dict[str, Any]) -> bool:
    """Judged on the load when the benchmark started: during it, the load is largely its own."""
    cpus = doc["machine"].get("cpus") or 1
    return doc["machine"].get("loadavg_before", [0])[0] / cpus > NOISY_LOAD_PER_CPU


def settle(max_wait_s: float = SETTLE_S, per_cpu: float = NOISY_LOAD_PER_CPU / 2) -> float:
    """Wait until the 1-minute load average falls to `per_cpu` per CPU (a previous benchmark's
    stack, say), at most `max_wait_s`; returns the seconds waited."""
    cpus = os.cpu_count() or 1
    t0 = time.monotonic()
    if loadavg()[0] / cpus > per_cpu:
        log(f"waiting up to {max_wait_s:.0f} s for the load average ({loadavg()[0]}) to settle")
    while loadavg()[0] / cpus > per_cpu and time.monotonic() - t0 < max_wait_s:
        time.sleep(5)
    return round(time.monotonic() - t0, 1)


def table(rows: Sequence[Sequence[Any]], head: Sequence[str]) -> str:
    """A plain-text table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in head]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Sequence[Any]], head: Sequence[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list[float], list[float]]],
         logx: bool = False) -> str | None:
    """A line plot per series; None (and no file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (pip extra `bench`): no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and not math.isnan(y)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# -- the model ------------------------------------------------------------------------------------
def served_model() -> tuple[Path, str]:
    """(directory, version) of the registry's "generation" pointer: the model the pipeline serves."""
    from services.generation import model_ref

    return model_ref.resolve()


def hf_dir() -> Path:
    """The float32 Hugging Face checkpoint every ONNX build came from."""
    from model.paths import build_dir

    return build_dir() / "hf-fp32"


def gguf_path() -> Path:
    from model.paths import build_dir
    from model.source import GGUF_NAME

    return build_dir() / "gguf" / GGUF_NAME


def chat_prompt(question: str) -> str:
    from model.chat_template import render_chatml

    return render_chatml([{"role": "user", "content": question}], add_generation_prompt=True)


# -- the stack -------------------------------------------------------------------------------------
@contextlib.contextmanager
def broker() -> Iterator[str]:
    """The local broker for the block: the one already up, or one started here and stopped after
    (nested blocks reuse the outer one). Benchmarks used to leave theirs running, and the next
    `make test` then ran on another checkout's broker."""
    from devtools import kafka_broker

    started = kafka_broker.ensure_broker(BOOTSTRAP)
    try:
        yield BOOTSTRAP
    finally:
        kafka_broker.release_broker(started, BOOTSTRAP)


@contextlib.contextmanager
def stack(services: Sequence[str] | None = None,
          extra_env: dict[str, dict[str, str]] | None = None) -> Iterator[Any]:
    """The test harness's Stack (separate OS processes, free ports), or only some of its services.

    Holds ``flock /tmp/colloquy-stack.lock`` while the stack lives (``stack_lock``: a run that
    holds it already keeps it): two stacks on two cores starve each other. scripts/test.sh does
    not take it: ``flock /tmp/colloquy-stack.lock make test`` keeps benchmarks off a test run.
    """
    from devtools import kafka_broker
    from devtools.procs import free_port
    from devtools.services import MODULES, ORDER
    from devtools.stack import Stack
    from services.common import topics

    lock = stack_lock()
    lock.__enter__()
    started_kafka = kafka_broker.ensure_broker(BOOTSTRAP)  # not broker(): the lock above comes first
    # The harness writes each service's log to $TMPDIR/colloquy-test-*.log and reads it back to see
    # "serving"; other sessions' clean-ups remove those in /tmp, so ours go to a folder of our own
    # (the services themselves keep the usual TMPDIR, Ray's included).
    old_tmp = os.environ.get("TMPDIR")
    logs = Path(tempfile.gettempdir()) / "colloquy-bench-logs"
    logs.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(logs)
    env = {name: {"TMPDIR": old_tmp or "/tmp", **(extra_env or {}).get(name, {})} for name in MODULES}
    # The replica's own /metrics (off in the test harness): bench.pipeline reads the engine's queue
    # time and TTFT from it.
    env["generation"].setdefault("GENERATION_REPLICA_METRICS_PORT", str(free_port()))
    s = Stack(BOOTSTRAP, extra_env=env)
    try:
        if services is None:
            log("starting the whole stack (Ray first; minutes on 2 cores)")
            s.start()
        else:
            topics.ensure_topics(BOOTSTRAP)
            for name in [n for n in ORDER if n in services]:
                s.spawn(name)
                s.wait_serving(name, timeout=400)
        # Only the services asked for have ports: the generation service alone has no gateway.
        log("stack up: " + ", ".join(f"{n} 127.0.0.1:{p}" for n, p in s.ports.items() if n in s.procs))
        cpu0 = stack_cpu(s)
        t0 = time.perf_counter()
        yield s
    finally:
        try:
            if "cpu0" in locals():
                used = {k: round(v - cpu0.get(k, 0.0), 1) for k, v in stack_cpu(s).items()}
                write_json("stack_cpu", {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": used,
                                         "note": "CPU seconds each stack process (with its children: Ray's for "
                                                 "generation) used while the stack benchmarks ran"})
        except Exception as exc:  # a diagnostic only
            log(f"stack CPU accounting failed: {exc}")
        s.stop()
        kafka_broker.release_broker(started_kafka, BOOTSTRAP)
        lock.__exit__(None, None, None)  # releases the flock unless an outer run holds it
        if old_tmp is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmp


_held = 0  # stack_lock() depth in this process


@contextlib.contextmanager
def stack_lock() -> Iterator[None]:
    """``flock STACK_LOCK`` for a heavy run (a stack, or in-process contenders): exclusive use of
    the shared cores. Reentrant in this process, so that a benchmark holding it across its
    in-process part and its stack keeps the machine in between; with COLLOQUY_STACK_LOCK_HELD=1
    the caller holds it (``flock /tmp/colloquy-stack.lock make bench ...``) and this takes nothing.
    """
    import fcntl

    global _held
    f = None
    if _held == 0 and os.environ.get("COLLOQUY_STACK_LOCK_HELD") != "1":
        f = open(STACK_LOCK, "a")  # noqa: SIM115 - closed below
        if not _try_lock(f):
            log(f"waiting for {STACK_LOCK} (another heavy run holds it)")
            fcntl.flock(f, fcntl.LOCK_EX)
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if f is not None:
            f.close()  # releases the flock


def stack_cpu(s: Any) -> dict[str, float]:
    """CPU seconds (user + system) of each stack service so far, its child processes included."""
    import psutil

    out: dict[str, float] = {}
    for name, proc in s.procs.items():
        try:
            root = psutil.Process(proc.popen.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        out[name] = total
    return out


def write_json(name: str, doc: dict[str, Any]) -> Path:
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _try_lock(f: Any) -> bool:
    import fcntl

    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def wait_grpc(target: str, timeout: float = 60.0) -> None:
    import grpc

    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout)
