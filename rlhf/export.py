"""Export an RLHF child the way its parent is served, keeping the fidelity the quality gate asks for.

A parent built from the GGUF's own blocks (``build.carried`` in its manifest) gets a child made the
same way from the child's float32 weights: the builder's graph, then ggml's Q4_1 rounding of every
projection with the split correction and the Q8_0 tied table (``model.carry_blocks.fp32_weights``);
the same quantizer reproduces the GGUF's blocks from the base's weights, so parent and child are
rounded alike. The decoder layers the child trained (weights unlike its parent's) get Q8_0
projections instead: a Q4_1 re-rounding erased most of a round's update. Other parents are
exported with their own builder settings.

When the parent passed the build's quality gate, the child is scored too, against its own float32
export: if the served export falls more than the gate's points below it, an int8 export is tried
(4-bit lost too much). The served export must also stay within the gate's points of its parent's
score (training may not cost knowledge); the manifest's ``quality.gate`` records both outcomes and
the registry refuses to promote a child that failed either.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Export:
    """The served export of a child, how it was made, and its quality (None when not scored)."""

    path: Path
    precision: str
    execution_provider: str
    build: dict[str, Any]
    quality: dict[str, Any] | None = None
    scores: dict[str, Any] = field(default_factory=dict)  # every export's quiz summary, for the report
    fidelity: dict[str, Any] | None = None  # served vs float32 greedy answers (export_within_gate)
    served_answers: list[str] | None = None  # the served export's answers to the fidelity prompts


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {"score": result["score"], "total": result["total"], "score_pct": result.get("score_pct"),
            "capitals_16": result.get("capitals_16")}


def export_settings(manifest: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
    """Precision, execution provider and builder options of the parent, so the child is served alike."""
    builder = (manifest.get("build") or {}).get("builder") or {}
    return (builder.get("precision", manifest["precision"]),
            builder.get("execution_provider", manifest["execution_provider"]),
            dict(builder.get("extra_options") or {}))


def _builder(policy_dir: Path, out: Path, precision: str, provider: str, extra: dict[str, str],
             log_path: Path) -> Path:
    from model.onnx_export import run_builder

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run_builder(policy_dir, out, precision, provider, extra, log_path=log_path, in_process=True)
    return out


# The 8-bit nodes of a child's trained layers quantize their activations to int8 (level 4): measured
# on a real round's child (2026-12-03), its 24 held-out greedy answers took 14.8 s against 18.6 s for
# the all-4-bit float32-activation export and 27.3 s at level 0 (ONNX Runtime dequantizes 8-bit
# weights on every call there); 15 (level 4) and 19 (level 0) of 24 equal the child's float32's.
EIGHT_BIT_ACCURACY_LEVEL = 4


def trained_layers(policy_dir: Path, parent_hf: Path) -> frozenset[int]:
    """Decoder layers whose weights the child changed (RLHF may train only the top few)."""
    from safetensors.numpy import load_file

    child = load_file(str(policy_dir / "model.safetensors"))
    parent = load_file(str(parent_hf / "model.safetensors"))
    return frozenset(int(name.split(".")[2]) for name, value in child.items()
                     if name.startswith("model.layers.")
                     and (name not in parent or not np.array_equal(value, parent[name])))


def export_like_parent(policy_dir: Path, run_dir: Path, parent: dict[str, Any],
                       parent_hf: Path | None = None) -> Export:
    """The child's served export, in ``run_dir/export`` (no scoring).

    With ``parent_hf`` (the parent's float32 weights) and a carried parent, the layers the child
    trained get Q8_0 projections instead of Q4_1: a round's update is small against a 4-bit step,
    and re-rounding it to Q4_1 put most of the child back on its parent's blocks (measured: 18 of
    24 held-out greedy answers of the exported child equal to the parent's, 3 of 24 for the
    child's float32 weights).
    """
    carried = (parent.get("build") or {}).get("carried")
    if carried:  # the graph is the base variant's builder output, whatever an older manifest says
        from model.build import VARIANTS, builder_settings

        graph_settings = builder_settings(VARIANTS[carried["graph_from"]])
        precision, provider = graph_settings["precision"], graph_settings["execution_provider"]
        extra = dict(graph_settings["extra_options"])
    else:
        precision, provider, extra = export_settings(parent)
    out = run_dir / "export"
    shutil.rmtree(out, ignore_errors=True)
    build: dict[str, Any] = {"builder": {"precision": precision, "execution_provider": provider,
                                         "extra_options": extra}}
    if carried:
        from safetensors.numpy import load_file

        from model.carry_blocks import carry, fp32_weights

        graph = _builder(policy_dir, run_dir / "export-graph", precision, provider, extra,
                         run_dir / "builder.log")
        eight_bit = trained_layers(policy_dir, parent_hf) if parent_hf is not None else frozenset()
        level = int(carried["accuracy_level"])
        counts = carry(graph, out, fp32_weights(load_file(str(policy_dir / "model.safetensors")), eight_bit),
                       accuracy_level=lambda layer, _proj: EIGHT_BIT_ACCURACY_LEVEL if layer in eight_bit else level,
                       exact_top_k=int(carried["exact_top_k"]))
        if carried.get("lut"):  # the parent's 4-bit products are table-lookup nodes: so are the child's
            from model.lut_graph import to_lut

            counts.update(to_lut(out))
        shutil.rmtree(graph, ignore_errors=True)
        build["carried"] = {**carried, "weights": "child fp32 -> Q4_1 / Q8_0 (ggml rounding)",
                            "eight_bit_layers": sorted(eight_bit),
                            "eight_bit_accuracy_level": EIGHT_BIT_ACCURACY_LEVEL}
        build["variant"] = f"rlhf-carried-{precision}-{provider}"
        log.info("child exported with carried blocks: %s", counts)
    else:
        _builder(policy_dir, out, precision, provider, extra, run_dir / "builder.log")
        build["variant"] = f"rlhf-{precision}-{provider}"
    return Export(out, precision, provider, build)


def greedy_texts(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of an exported model to ready-made prompts."""
    from model.genai import greedy, load

    model, tokenizer = load(model_dir, "cpu")
    return [greedy(model, tokenizer, [int(t) for t in tokenizer.encode(p)], max_new_tokens).text for p in prompts]


def export_within_gate(policy_dir: Path, run_dir: Path, parent: dict[str, Any],
                       parent_hf: Path | None = None, fidelity_prompts: list[str] | None = None,
                       fidelity_tokens: int = 64) -> Export:
    """The served export, scored against the child's float32 export; int8 when 4-bit loses too much.

    With ``fidelity_prompts``, also how many greedy answers of the served export equal the float32
    export's: the quiz gate sees lost knowledge, not a lost RLHF update (a Q4_1 export of a real
    round's child kept its quiz score and 3 of its 24 held-out answers).
    """
    from model.quality import GATE_POINTS, run_quality, within_gate

    served = export_like_parent(policy_dir, run_dir, parent, parent_hf)
    if "score" not in (parent.get("quality") or {}):
        return served  # the parent was never scored (the tiny test model): nothing to compare with
    fp32_dir = _builder(policy_dir, run_dir / "export-fp32", "fp32", "cpu", {}, run_dir / "builder-fp32.log")
    reference = run_quality(fp32_dir, provider="cpu")
    fp32_answers = greedy_texts(fp32_dir, fidelity_prompts, fidelity_tokens) if fidelity_prompts else None
    shutil.rmtree(fp32_dir, ignore_errors=True)
    result = run_quality(served.path, provider="cpu")
    served.scores = {"child_fp32": _summary(reference), served.build["variant"]: _summary(result)}
    if served.precision != "fp32" and not within_gate(result["score_pct"], reference["score_pct"]):
        log.warning("child's %s export scored %.1f%% against its fp32's %.1f%%: trying int8",
                    served.build["variant"], result["score_pct"], reference["score_pct"])
        int8_dir = _builder(policy_dir, run_dir / "export-int8", "int8", "cpu", {}, run_dir / "builder-int8.log")
        int8 = run_quality(int8_dir, provider="cpu")
        served.scores["rlhf-int8-cpu"] = _summary(int8)
        if int8["score_pct"] > result["score_pct"]:
            shutil.rmtree(served.path, ignore_errors=True)
            int8_dir.rename(served.path)
            served.precision, served.execution_provider, result = "int8", "cpu", int8
            served.build = {"variant": "rlhf-int8-cpu", "builder": {
                "precision": "int8", "execution_provider": "cpu", "extra_options": {}}}
        shutil.rmtree(int8_dir, ignore_errors=True)
    result["provider"] = "cpu"
    # Two checks: the export kept the child's float32 quality (fidelity), and the child did not
    # lose knowledge to its parent (training's cost: a real DPO child that won 17/4/3 under the
    # rule scored 75.5% on the quiz against its parent's 79.3%).
    parent_pct = float(parent["quality"]["score_pct"])
    kept = within_gate(result["score_pct"], reference["score_pct"])
    no_worse = within_gate(result["score_pct"], parent_pct)
    result["gate"] = {"reference": "child fp32", "reference_pct": reference["score_pct"],
                      "parent_pct": parent_pct, "score_pct": result["score_pct"], "points": GATE_POINTS,
                      "passed_vs_reference": kept, "passed_vs_parent": no_worse, "passed": kept and no_worse}
    served.quality = result
    if fidelity_prompts and fp32_answers is not None:  # the export finally served (int8 if it replaced 4-bit)
        served.served_answers = greedy_texts(served.path, fidelity_prompts, fidelity_tokens)
        served.fidelity = {"prompts": len(fidelity_prompts), "max_new_tokens": fidelity_tokens,
                           "served_equals_fp32": sum(a == b for a, b in zip(fp32_answers, served.served_answers,
                                                                              strict=True))}
    return served
