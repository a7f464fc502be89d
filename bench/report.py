"""``bench/results/REPORT.md`` from the suite's JSON: every goal, where it stands, and the tables.

Written by ``python -m bench`` (or ``python -m bench report`` from the JSON already there); never
edited by hand. A goal whose benchmark did not run says so instead of guessing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import common, conversation, engine, pipeline, stages

REPORT = common.RESULTS / "REPORT.md"


def _load(name: str) -> dict[str, Any] | None:
    path = common.RESULTS / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _get(doc: dict[str, Any] | None, *keys: str) -> Any:
    cur: Any = doc
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def goals(docs: dict[str, dict[str, Any] | None]) -> list[list[str]]:
    """(goal, target, measured, status) rows."""
    eng, pip, conv = docs.get("engine"), docs.get("pipeline"), docs.get("conversation")
    rows = []

    delivered = _get(pip, "results", "1", "delivered_decode_tok_s", "median")
    ort_itl = _get(pip, "results", "1", "ort_direct_itl_ms", "median")
    dep = _get(eng, "results", "colloquy", "single", "decode_tok_s", "median")
    eng_ort = _get(eng, "results", "ort-genai", "single", "decode_tok_s", "median")
    if delivered and ort_itl:  # both from the pipeline run, chat by chat under the same load
        ort = 1000 / ort_itl
        extra = (f"; the deployment called directly (engine benchmark, same run as its ORT figure): {dep:.1f} vs "
                 f"{eng_ort:.1f} tok/s = {dep / eng_ort:.0%}") if dep and eng_ort else ""
        rows.append(["single-stream decode through the pipeline", ">= 90% of ORT GenAI direct",
                     f"{delivered:.1f} tok/s delivered through the gateway (first token made -> last text at the "
                     f"client) vs {ort:.1f} tok/s ORT GenAI in the same run = {delivered / ort:.0%}{extra}",
                     _status(delivered / ort >= 0.9)])
    else:
        rows.append(["single-stream decode through the pipeline", ">= 90% of ORT GenAI direct",
                     "not measured in one run (run `python -m bench pipeline`)", "unknown"])

    one = _get(eng, "results", "colloquy", "streams", "1", "median")
    sixteen = _get(eng, "results", "colloquy", "streams", "16", "median")
    if one and sixteen:
        o1 = _get(eng, "results", "ort-genai", "streams", "1", "median")
        o16 = _get(eng, "results", "ort-genai", "streams", "16", "median")
        ceiling = f"; ORT GenAI direct, 16 rows of one batched Generator: {o16 / o1:.2f}x" if o1 and o16 else ""
        rows.append(["16-stream aggregate (Colloquy deployment)", ">= 3x single-stream",
                     f"{sixteen:.1f} vs {one:.1f} tok/s = {sixteen / one:.2f}x{ceiling}", _status(sixteen / one >= 3)])
    else:
        rows.append(["16-stream aggregate (Colloquy deployment)", ">= 3x single-stream", "not measured", "unknown"])

    over = _get(pip, "results", "1", "ttft_overhead_ms", "median")
    beyond = _get(pip, "results", "1", "ttft_overhead_beyond_moderation_hold_ms", "median")
    if over is not None:
        note = f" ({beyond:.0f} ms of it beyond output moderation's first-chunk hold)" if beyond is not None else ""
        rows.append(["gateway TTFT overhead p50 (1 chat)", "<= 15 ms", f"{over:.0f} ms{note}", _status(over <= 15)])
    else:
        rows.append(["gateway TTFT overhead p50 (1 chat)", "<= 15 ms", "not measured", "unknown"])

    t1 = _get(conv, "results", "gateway", "1", "ttft_ms", "median")
    turns = conv["params"]["turns"] if conv else 20
    tn = _get(conv, "results", "gateway", str(turns), "ttft_ms", "median")
    if t1 and tn:
        rows.append([f"turn-{turns} TTFT (gateway)", "<= 1.5x turn 1",
                     f"{tn:.0f} vs {t1:.0f} ms = {tn / t1:.2f}x", _status(tn / t1 <= 1.5)])
    else:
        rows.append([f"turn-{turns} TTFT (gateway)", "<= 1.5x turn 1", "not measured", "unknown"])
    e1 = _get(conv, "results", "engine", "reuse", "1", "ttft_ms", "median")
    en = _get(conv, "results", "engine", "reuse", str(turns), "ttft_ms", "median")
    fresh = _get(conv, "results", "engine", f"turn{turns}_over_turn1", "fresh")
    if e1 and en:
        without = f"; without the prefix cache {fresh:.2f}x" if fresh else ""
        rows.append([f"turn-{turns} TTFT (generation engine, prefix cache)", "<= 1.5x turn 1",
                     f"{en:.0f} vs {e1:.0f} ms = {en / e1:.2f}x{without}", _status(en / e1 <= 1.5)])
    return rows


def _status(ok: bool) -> str:
    return "met" if ok else "**not met**"


def noise(docs: dict[str, dict[str, Any] | None]) -> list[str]:
    lines = []
    for name, doc in docs.items():
        if doc is None:
            lines.append(f"- `{name}`: no results (not run)")
            continue
        m = doc["machine"]
        flag = "**noisy** (load above " f"{common.NOISY_LOAD_PER_CPU} per CPU)" if doc.get("noisy") else "quiet enough"
        lines.append(f"- `{name}`: load average {m['loadavg_before'][0]} -> {m.get('loadavg_after', ['?'])[0]} "
                     f"on {m['cpus']} CPUs, {doc.get('seconds', '?')} s: {flag}")
    return lines


def write(path: Path = REPORT) -> Path:
    docs = {n: _load(n) for n in ("engine", "pipeline", "conversation", "stages")}
    out = ["# Colloquy benchmark report", "",
           "Generated by `make bench` (`python -m bench`) from the JSON next to this file; do not edit.", ""]
    anydoc = next((d for d in docs.values() if d), None)
    if anydoc:
        out += [f"Machine: {anydoc['machine']['processor']}, {anydoc['machine']['cpus']} CPUs "
                f"({anydoc['machine']['platform']}). Model: "
                f"`{_get(docs.get('engine'), 'params', 'model_version') or _get(anydoc, 'params', 'model_version')}`.",
                ""]
    out += ["## Goals", "", common.markdown_table(goals(docs), ["goal", "target", "measured", "status"]), ""]
    noisy = [n for n, d in docs.items() if d and d.get("noisy")]
    out += ["## Load", ""]
    if noisy:
        out += [f"Other work was running when {', '.join(noisy)} started: those figures are **noisy** and "
                "ratios measured in the same run are more trustworthy than absolute numbers.", ""]
    out += ["Each benchmark waits (up to 90 s) for the 1-minute load average to settle before it starts; "
            "the figure that judges noise is the load at its start. The load at its end includes the "
            "benchmark's own work (the stack's services under 16 concurrent chats), which is not noise.", ""]
    out += [*noise(docs), ""]

    eng = docs.get("engine")
    if eng:
        head, body = engine.rows(eng)
        out += ["## Engine", "", f"Greedy, max_tokens {eng['params']['max_tokens']}, same prompts for all. "
                "`decode tok/s b1`: batch 1 without the first token; `agg@N`: all tokens of N concurrent "
                "streams over wall time; ratios against ONNX Runtime GenAI direct.", "",
                common.markdown_table(body, head), "", "Issue 15's goals, ratios within this run:", "",
                common.markdown_table(engine.goals(eng), engine.GOAL_HEAD), ""]
        cfg = eng["params"].get("colloquy_engine")
        if cfg:
            out += [f"Colloquy deployment engine settings: {cfg}.", ""]
        dep_load = _get(eng, "results", "colloquy", "loadavg")
        if dep_load:
            out += [f"Measured at different times: the in-process contenders from load "
                    f"{eng['machine']['loadavg_before'][0]}, the Colloquy deployment (on the running stack) at "
                    f"load {dep_load['before'][0]} -> {dep_load['after'][0]}. The deployment also competes with "
                    "the stack's other services, which poll Kafka even when idle, and Ray runs its workers (the "
                    "generation replica included) at niceness 15, so on a shared machine the replica yields "
                    "the CPU to every ordinary process: compare it with ORT GenAI only on a quiet machine.", ""]
        out += [f"- skipped {k}: {v}" for k, v in eng.get("skipped", {}).items()]
        if eng.get("plot"):
            out += ["", f"![aggregate tok/s]({Path(eng['plot']).name})"]
        out += [""]
    pip = docs.get("pipeline")
    if pip and pip.get("results"):
        body = []
        for c, r in pip["results"].items():
            body.append([c, f"{r['gateway_ttft_ms']['median']} / {r['gateway_ttft_ms']['p99']}",
                         f"{r['direct_ttft_ms']['median']} / {r['direct_ttft_ms']['p99']}",
                         f"{r['ttft_overhead_ms']['median']} / {r['ttft_overhead_ms']['p99']}",
                         r["ttft_overhead_beyond_moderation_hold_ms"]["median"], r["first_delta_chars"]["median"],
                         f"{r['gateway_itl_ms']['median']} / {r['direct_itl_ms']['median']}",
                         f"{r['gateway_delta_gap_ms']['median']} / {r['gateway_delta_gap_ms']['p99']}"])
        out += ["## Pipeline overhead", "", pipeline.__doc__.split("\n\n")[1].replace("\n", " "), "",
                common.markdown_table(body, ["concurrent chats", "gateway TTFT p50 / p99 ms",
                                             "direct TTFT p50 / p99 ms", "overhead p50 / p99 ms",
                                             "overhead beyond moderation hold p50 ms", "first delta chars",
                                             "ITL gateway / direct ms", "gateway delta gap p50 / p99 ms"]), ""]
        hops = _get(pip, "results", "1", "hops_ms")
        if hops:
            how = " ".join((pipeline.hop_breakdown.__doc__ or "").split("\n\n")[1].split())
            out += [f"Where the gateway's time to first token goes at 1 chat, hop by hop. {how}", "",
                    common.markdown_table([[name, h["median"], h["p99"]] for name, h in hops.items()],
                                          ["hop (to this stage's first output)", "p50 ms", "p99 ms"]), ""]
        ort_itl = _get(pip, "results", "1", "ort_direct_itl_ms", "median")
        if ort_itl:
            ort_ttft = _get(pip, "results", "1", "ort_direct_ttft_ms", "median")
            out += [f"ORT GenAI direct in the same run, same prompts: ITL p50 {ort_itl} ms "
                    f"({1000 / ort_itl:.1f} tok/s), TTFT p50 {ort_ttft} ms.", ""]
    elif pip:
        out += ["## Pipeline overhead", "", *[f"- skipped {k}: {v}" for k, v in pip.get("skipped", {}).items()], ""]
    conv = docs.get("conversation")
    if conv:
        out += ["## Long conversations", "", "```", conversation.render(conv), "```", "",
                f"First tokens identical between fresh and continued Generators: "
                f"{_get(conv, 'results', 'kv_reuse', 'same_first_token')} of "
                f"{_get(conv, 'results', 'kv_reuse', 'compared')}.", ""]
        out += [f"- skipped {k}: {v}" for k, v in conv.get("skipped", {}).items()] + [""]
    st = docs.get("stages")
    if st:
        out += ["## Stages", "", "```", stages.render(st), "```", "",
                "`EpollSelector.select` and `Condition.wait` are kafka-python's I/O thread and the worker "
                "waiting on the broker (transaction commits, fetches); the rest is the stage's own work.", ""]
    cpu = _load("stack_cpu")
    if cpu:
        rows = sorted(cpu["cpu_s"].items(), key=lambda kv: -kv[1])
        out += ["## Where the stack's CPU went", "",
                f"CPU seconds per service (children included) over {cpu['wall_s']} s of stack benchmarks "
                f"(the machine has {anydoc['machine']['cpus'] if anydoc else '?'} CPUs):", "",
                common.markdown_table([[n, c, f"{c / cpu['wall_s']:.0%}"] for n, c in rows],
                                      ["service", "CPU s", "of one core"]), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out).rstrip() + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write())
