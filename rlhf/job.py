"""The offline RLHF job: feedback since the last run -> reward model -> PPO -> ONNX -> new registry version.

``python -m rlhf.job [--base VERSION] [--registry DIR] [--dataset DIR] [--source all] [--algorithm ppo|dpo|both]
[--rounds N --label-command CMD [--serve-rounds] [--origin V]] [--fresh] [--replay ...]
[--canary P [--canary-watch S]]``
(``make rlhf``, ``make rlhf-rounds ROUNDS=N``). Steps:

1. Start from the registry's current ``generation`` version (or ``--base``) and its float32
   weights (:func:`base_hf_dir`), and take the feedback created since the window end that
   the base's manifest records (``rlhf.data``).
2. On Ray Train (``TorchTrainer``, ``ScalingConfig`` from ``rlhf.config``): train the reward
   model, then PPO and/or DPO on the policy (``RLHF_ALGORITHM``; ``rlhf.train``); every step is
   reported to Ray Train and, with ``PUSHGATEWAY_URL``, to a Prometheus Pushgateway.
3. Export the policy as the parent is served (``rlhf.export``: the GGUF-carried construction
   from the child's float32 weights, or the parent's builder settings), score it against the
   child's own float32 export on the quality gate (int8 when 4-bit loses too much), judge
   parent and child answers on the held-out prompts of ``rlhf/prompts.yaml`` with
   ``rlhf.preference.score``, and publish a new version whose manifest names its parent, the
   feedback window, the metrics and the gate's outcome. The ``generation`` pointer does not
   move: promotion is ``python -m model.registry promote generation V`` (refused when the
   child failed the gate), or step 4.
   With ``--replay`` (``RLHF_REPLAY``), before publishing, logged prompts of the conversation
   store are re-run on the child and on the served version and judged by the rule, the reward
   model and the moderation service (``rlhf.replay``); the manifest and report get ``replay``.
4. With ``--canary P`` (off by default; on in the k8s CronJob): the last round's child, if it
   passed the quality gate and the replay evaluation, is served to P% of conversations,
   compared with the stable version in Prometheus for ``--canary-watch`` seconds, then promoted
   or rolled back, and the decision with its reasons recorded in the registry (``rlhf.canary``).

``--rounds N`` repeats label -> train -> evaluate -> publish N times (:func:`run_rounds`), each
round from the previous round's child, so each reads only feedback newer than the previous
window; ``--label-command`` runs before each round. With ``--serve-rounds`` each round's base is
served (the announced rollout, :func:`announced_server`) before its labels are drawn, so the
labellers rank answers of the model the round starts from; the labelers check the version that
answered (``RLHF_ROUND_BASE``) and rank nothing else. ``--origin V`` goes on with a series that
started from V in an earlier run (``--base`` is one of its children): the rounds are numbered on
and each child is also judged against V.

A run's state lives in ``<cache>/rlhf/runs/<base>-<source>/`` (``run.json``, the reward model
and PPO checkpoints): running the job again after an interruption resumes it with the same
feedback window; ``--fresh`` discards it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model import sampling
from model.paths import build_dir, cache_root
from model.registry import DEFAULT_DEPLOYMENT, Registry, RegistryError, check_quality_gate
from rlhf import data
from rlhf.config import RLHFConfig, load_config
from rlhf.export import export_within_gate
from rlhf.metrics import JobMetrics

if TYPE_CHECKING:
    from rlhf.replay import ReplaySet

log = logging.getLogger("rlhf.job")
REPO = Path(__file__).resolve().parent.parent
PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.yaml"
SOURCE = "rlhf"
# Run in every worker of the job's own Ray (services/common/private_api.py says why).
PG_CLEANER_HOOK = "services.common.private_api.quiet_placement_group_cleaner"


class JobError(RuntimeError):
    """The job cannot run as asked (no base model, no weights, too little feedback)."""


def runs_dir() -> Path:
    return cache_root() / "rlhf" / "runs"


# ----------------------------------------------------------------- the base model
def base_hf_dir(registry: Registry, version: str, run_dir: Path) -> Path:
    """The float32 Hugging Face weights a registry version was built from.

    * an RLHF version carries them in its ``hf/`` folder;
    * a model build names the float32 checkpoint by digest (``build.hf_fp32_digest``), found
      in the build cache (``make model`` puts it there);
    * the tiny random test model is rebuilt from its seed (same torch, same weights).
    """
    from model.steps import read_stamp

    manifest = registry.manifest(version)
    own = registry.version_path(version) / "hf"
    if (own / "model.safetensors").is_file():
        return own
    digest = (manifest.get("build") or {}).get("hf_fp32_digest")
    if digest:
        hf = build_dir() / "hf-fp32"
        stamp = read_stamp(hf)
        if stamp and stamp.get("outputs_digest") == digest:
            return hf
        raise JobError(f"{version} was built from float32 weights {digest[:12]} that are not in {hf}: "
                       "run `make model` to rebuild them")
    from model.tiny import SEED, TINY_CONFIG, TINY_SOURCE

    if manifest.get("source") == TINY_SOURCE:
        out = run_dir / "base-hf"
        if not (out / "model.safetensors").is_file():
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM

            from model.hf_export import copy_tokenizer, save_checkpoint

            torch.manual_seed(SEED)
            save_checkpoint(LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)), out)
            copy_tokenizer(registry.version_path(version), out)
        return out
    raise JobError(f"no float32 weights known for {version} (source {manifest.get('source')!r})")


# ----------------------------------------------------------------- run state
def _now_ms() -> int:
    return int(time.time() * 1000)


def prepare_run(registry: Registry, base: str, config: RLHFConfig, fresh: bool,
                now_ms: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The run directory and its ``run.json``: resumed when an unfinished run of the same base,
    source and hyperparameters is there, else started with the window ``[since, now)``."""
    run_dir = runs_dir() / f"{base}-{config.source}"
    state_file = run_dir / "run.json"
    if state_file.is_file() and not fresh:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state.get("status") == "training" and state.get("hyperparameters") == config.hyperparameters():
            log.info("resuming run in %s (window %s)", run_dir, state["feedback_window"])
            return run_dir, state
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    since = data.window_since(registry.manifest(base))
    window = data.FeedbackWindow(since, now_ms if now_ms is not None else _now_ms())
    state = {"base_version": base, "source": config.source, "feedback_window": window.as_dict(),
             "hyperparameters": config.hyperparameters(), "status": "training",
             "started_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()}
    _write_json(state_file, state)
    return run_dir, state


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------- Ray Train
def train_on_ray(config: RLHFConfig, loop_config: dict[str, Any], run_dir: Path) -> None:
    """Run ``rlhf.train.train_loop_per_worker`` on a ``TorchTrainer``; Ray retries a failed worker
    group once, and the file checkpoints make the retry resume."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rlhf.train import train_loop_per_worker

    started_ray = False
    if not ray.is_initialized():
        path = os.pathsep.join([str(REPO), str(REPO / "build" / "python"), os.environ.get("PYTHONPATH", "")])
        ray.init(address=config.ray_address or None, num_cpus=config.ray_num_cpus or None,
                 include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path.rstrip(os.pathsep), "HF_HUB_OFFLINE": "1",
                                           "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"},
                              # no dashboard, so no state API: keep Ray Train's cleaner from warning each second
                              "worker_process_setup_hook": PG_CLEANER_HOOK})
        started_ray = True
    try:
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.gpu(),
                                         resources_per_worker={"CPU": config.cpus_per_worker}),
            run_config=RunConfig(name="rlhf", storage_path=str((run_dir / "ray").resolve()),
                                 failure_config=FailureConfig(max_failures=1)))
        trainer.fit()
    finally:
        if started_ray:
            from services.generation.serving import shutdown_ray

            shutdown_ray(serve_apps=False)


# ----------------------------------------------------------------- evaluation
def heldout_prompts() -> list[str]:
    """The held-out questions of ``rlhf/prompts.yaml`` (never used to label or train)."""
    import yaml

    return list(yaml.safe_load(PROMPTS_FILE.read_text(encoding="utf-8"))["heldout"])


def _greedy_key(model_dir: Path, prompts: list[str], max_new_tokens: int) -> str:
    import hashlib

    digest = hashlib.sha256("\0".join(prompts).encode("utf-8")).hexdigest()[:16]
    return f"{model_dir.resolve()}|{max_new_tokens}|{digest}"


def greedy_answers(model_dir: Path, prompts: list[str], max_new_tokens: int,
                   cache: dict[str, list[str]] | None = None) -> list[str]:
    """Greedy answers of an exported (served) model to ready-made prompts; ``cache`` keeps them by
    model directory and prompts, so a model judged twice on the same prompts answers once."""
    from rlhf.export import greedy_texts

    key = _greedy_key(model_dir, prompts, max_new_tokens)
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = greedy_texts(model_dir, prompts, max_new_tokens)
    return cache[key]


def evaluate(parent_dir: Path, child_dir: Path, questions: list[str], max_new_tokens: int,
             sampled_with: dict[str, Any] | None = None,
             cache: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Parent vs child on held-out questions (``rlhf.evaluation``): greedy answers of the exported
    (served) models in the served prompt layout, judged by the preference rule (and each of its
    terms); then, with ``sampled_with`` (the keyword arguments of :func:`rlhf.evaluation.sampled`
    but the answers), the reward model's view and the KL of the child to its parent. ``cache``
    keeps a model's greedy answers (:func:`greedy_answers`), so a parent judged against two children
    (PPO and DPO) answers once."""
    from rlhf import evaluation
    from rlhf.preference import best_score, score, terms

    prompts, template_version = evaluation.served_prompts(questions)
    clock = time.perf_counter()
    parent = greedy_answers(parent_dir, prompts, max_new_tokens, cache)
    child = greedy_answers(child_dir, prompts, max_new_tokens, cache)
    result: dict[str, Any] = {**evaluation.judge(questions, parent, child, score, terms, best_score),
                              "judge": "rlhf.preference.score",
                              "answers": "greedy, exported ONNX models", "prompt_template": template_version,
                              "max_new_tokens": max_new_tokens,
                              "examples": [{"question": q, "parent": p[:300], "child": c[:300]}
                                           for q, p, c in zip(questions, parent, child, strict=True)]}
    seconds = {"greedy": time.perf_counter() - clock}
    if sampled_with:
        clock = time.perf_counter()
        result.update(evaluation.sampled(prompts=prompts, questions=questions,
                                         greedy={"parent": parent, "child": child}, **sampled_with))
        seconds["sampled"] = time.perf_counter() - clock
    result["seconds"] = seconds
    return result


# ----------------------------------------------------------------- the job
def version_name(base: str, window: data.FeedbackWindow, weights_digest: str) -> str:
    """``<family>-rlhf-<window end, UTC>-<weights digest>``: sortable and content-tied."""
    family = base.split("-rlhf-")[0][:80]
    stamp = dt.datetime.fromtimestamp(window.until_ms / 1000, tz=dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{family}-rlhf-{stamp}-{weights_digest[:8]}"


def run(config: RLHFConfig, registry: Registry, base: str | None = None, dataset_root: Path | None = None,
        fresh: bool = False, now_ms: int | None = None, deployment: str = DEFAULT_DEPLOYMENT,
        origin: str | None = None) -> dict[str, Any]:
    """Run the whole job; returns a report naming the published version(s) (also in ``report.json``).

    ``config.algorithm`` ``both`` publishes two children of ``base`` (PPO and DPO) from the same
    comparisons, judged on the same held-out prompts; the report's top-level ``version`` is the
    first (PPO's) and ``children`` holds each. ``origin`` (the first base of a series of rounds)
    adds a second judgement of each child against it (``vs_origin``: rule wins, KL).
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    base = base or registry.current(deployment)
    if not base:
        raise JobError(f"deployment {deployment!r} has no current version in {registry.root}; pass --base")
    base_manifest = registry.load(base).manifest
    run_dir, state = prepare_run(registry, base, config, fresh, now_ms)
    window = data.FeedbackWindow(**state["feedback_window"])
    root = dataset_root or data.dataset_dir()
    items, stats = data.comparisons(data.read_rows(root, config.source, window))
    train, held = data.split(items, config.heldout_percent)
    log.info("feedback %s in %s: %s; %d train / %d held-out comparisons", config.source, window,
             stats.as_dict(), len(train), len(held))
    if len(train) < config.min_comparisons:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise JobError(f"only {len(train)} training comparisons in window {window.as_dict()} "
                       f"(need {config.min_comparisons}); nothing published")
    hf_dir = base_hf_dir(registry, base, run_dir)
    replay_set = _prepare_replay(config, registry, base, deployment, window, root)
    timings["prepare"] = time.perf_counter() - clock

    loop_config = {"run_dir": str(run_dir.resolve()), "base_hf_dir": str(hf_dir.resolve()),
                   "hp": config.hyperparameters(), "pushgateway_url": config.pushgateway_url,
                   "train": [dataclasses.asdict(c) for c in train],
                   "held_out": [dataclasses.asdict(c) for c in held],
                   "prompts": data.prompts_of(train)}
    if config.dpo_select == "validation":  # the questions DPO's checkpoints are chosen on, as served
        from rlhf import evaluation, validation

        asked = validation.questions()
        loop_config["validation"] = {"questions": asked, "prompts": evaluation.served_prompts(asked)[0]}
    if config.dpo_anchor > 0:  # the questions DPO holds the parent's answers on, as served
        from rlhf import evaluation, validation

        loop_config["anchor"] = {"prompts": evaluation.served_prompts(validation.questions(key="anchor"))[0]}
    clock = time.perf_counter()
    train_on_ray(config, loop_config, run_dir)
    timings["train"] = time.perf_counter() - clock
    from rlhf.train import METRICS_FILE, algorithms

    metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    shared = {"config": config, "registry": registry, "base": base, "base_manifest": base_manifest,
              "hf_dir": hf_dir, "run_dir": run_dir, "window": window, "metrics": metrics,
              "dataset": {"root": str(root), **stats.as_dict(), "train_comparisons": len(train),
                          "heldout_comparisons": len(held)},
              "origin": origin if origin and origin != base else None, "cache": {}, "replay_set": replay_set}
    children: dict[str, dict[str, Any]] = dict(state.get("children") or {})
    for algorithm in algorithms(config.algorithm):
        if algorithm in children:  # published before an interruption: not published twice
            continue
        children[algorithm] = _publish_child(algorithm, timings, **shared)
        state["children"] = children
        _write_json(run_dir / "run.json", state)
    primary = children[algorithms(config.algorithm)[0]]
    state.update(status="published", version=primary["version"])
    _write_json(run_dir / "run.json", state)
    for leftover in ("ray", "base-hf", "origin"):
        shutil.rmtree(run_dir / leftover, ignore_errors=True)

    gauges = JobMetrics(config.pushgateway_url)
    ppo_history = metrics.get("ppo") or []
    final = {**metrics["reward_model"], **(ppo_history[-1] if ppo_history else {})}
    gauges.update({k: v for k, v in final.items() if isinstance(v, int | float)},
                  {**metrics["phase_seconds"], **timings})
    report = {"version": primary["version"], "parent_version": base, "origin_version": origin or base,
              "path": primary["path"], "algorithm": config.algorithm,
              "feedback_window": window.as_dict(), "dataset": shared["dataset"],
              "reward_model": metrics["reward_model"],
              "ppo_final": ppo_history[-1] if ppo_history else None, "ppo_history": ppo_history,
              "dpo_history": metrics.get("dpo") or [], "dpo_heldout": metrics.get("dpo_heldout"),
              "evaluation": primary["evaluation"], "vs_origin": primary.get("vs_origin"),
              "replay": primary.get("replay"),
              "hyperparameters": config.hyperparameters(), "quality": primary["quality"],
              "children": children,
              "phase_seconds": {**metrics["phase_seconds"], **timings, **primary["phase_seconds"]}}
    _write_json(run_dir / "report.json", report)
    return report


def _prepare_replay(config: RLHFConfig, registry: Registry, base: str, deployment: str,
                    window: data.FeedbackWindow, dataset_root: Path) -> ReplaySet | None:
    """The logged prompts the candidates will replay (``rlhf.replay``), chosen once before training
    so a missing store stops the job early; None when ``RLHF_REPLAY`` is off."""
    if not config.replay:
        return None
    from rlhf import replay
    from services.common.config import load
    from services.conversation.config import StoreConfig

    try:
        replay_window = replay.window_for(window.until_ms, config.replay_hours, config.replay_since,
                                          config.replay_limit, config.replay_exclude_simulated)
        chosen = replay.prepare(config.replay_store or load(StoreConfig).url, replay_window, dataset_root,
                                registry.current(deployment) or base)
    except (ValueError, replay.ReplayError) as exc:
        raise JobError(f"replay: {exc}") from exc
    log.info("replay: %d logged prompts (%s)", len(chosen.turns), chosen.counts)
    return chosen


def dpo_method(config: RLHFConfig) -> str:
    """What the DPO trainer ran, as the manifest states it: DPO or SimPO, RPO (with the NLL term) or,
    with the pairwise term off, rejection-sampling fine-tuning on each ranking's best answer; and the
    anchor term when it is on."""
    anchor = (f" + KL to the parent on the anchor questions x {config.dpo_anchor}" if config.dpo_anchor else "")
    if config.dpo_pairwise == 0:
        return (f"rejection-sampling fine-tuning: the best answers' NLL x {config.dpo_nll}, no pairwise term"
                f"{anchor} (rlhf.job)")
    nll = f" + the best answers' NLL x {config.dpo_nll}" if config.dpo_nll else ""
    weight = f" x {config.dpo_pairwise}" if config.dpo_pairwise != 1 else ""
    if config.dpo_loss == "simpo":
        return (f"SimPO (mean log-probability per token, no reference), beta {config.dpo_beta}, gamma "
                f"{config.simpo_gamma}{weight}{nll}{anchor} (rlhf.job)")
    return f"DPO against the parent, beta {config.dpo_beta}{weight}{nll}{anchor} (rlhf.job)"


def _publish_child(algorithm: str, timings: dict[str, float], *, config: RLHFConfig, registry: Registry, base: str,
                   base_manifest: dict[str, Any], hf_dir: Path, run_dir: Path, window: data.FeedbackWindow,
                   metrics: dict[str, Any], dataset: dict[str, Any], origin: str | None,
                   cache: dict[str, list[str]], replay_set: ReplaySet | None) -> dict[str, Any]:
    """Export, judge and publish one child (``ppo`` or ``dpo``); its part of the report."""
    from model.hashing import sha256_file
    from rlhf.evaluation import served_prompts
    from rlhf.train import POLICY_DIRS, RM_CHECKPOINT

    seconds: dict[str, float] = {}
    policy_dir = run_dir / POLICY_DIRS[algorithm]
    work = run_dir / algorithm
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    clock = time.perf_counter()
    heldout = served_prompts(heldout_prompts())[0]
    exported = export_within_gate(policy_dir, work, base_manifest, parent_hf=hf_dir,
                                  fidelity_prompts=heldout, fidelity_tokens=config.eval_max_new_tokens)
    export_dir = exported.path
    if exported.served_answers is not None:  # the evaluation below judges the same answers
        cache[_greedy_key(export_dir, heldout, config.eval_max_new_tokens)] = exported.served_answers
    shutil.copytree(policy_dir, export_dir / "hf")
    seconds["export"] = time.perf_counter() - clock

    clock = time.perf_counter()
    questions = heldout_prompts()

    def sampled_with(parent_hf: Path) -> dict[str, Any] | None:
        if not config.eval_samples:
            return None
        return {"parent_hf": parent_hf, "child_hf": policy_dir, "reward_model_file": run_dir / RM_CHECKPOINT,
                "hp": config.hyperparameters(), "samples": config.eval_samples, "bound": config.kl_bound}

    evaluation = evaluate(registry.version_path(base), export_dir, questions, config.eval_max_new_tokens,
                          sampled_with(hf_dir), cache)
    vs_origin = None
    if origin:  # a later round: the child against the series' first base too
        origin_hf = base_hf_dir(registry, origin, run_dir / "origin")
        vs_origin = evaluate(registry.version_path(origin), export_dir, questions, config.eval_max_new_tokens,
                             sampled_with(origin_hf), cache)
        vs_origin.pop("examples", None)
        vs_origin["origin_version"] = origin
    seconds["evaluate"] = time.perf_counter() - clock
    replayed = None
    if replay_set is not None:  # logged prompts, candidate vs the served version, before publishing
        from rlhf import replay

        clock = time.perf_counter()
        replayed = replay.evaluate(
            replay_set, export_dir, registry.version_path(replay_set.served_version),
            lambda model_dir, prompts: greedy_answers(model_dir, prompts, config.eval_max_new_tokens, cache),
            replay.reward_scorer(hf_dir, run_dir / RM_CHECKPOINT, config.hyperparameters()),
            config.moderation_addr, config.replay_rule_margin, config.replay_max_block_increase)
        seconds["replay"] = time.perf_counter() - clock

    clock = time.perf_counter()
    version = version_name(base, window, sha256_file(policy_dir / "model.safetensors"))
    train_seconds = {"reward_model": metrics["phase_seconds"].get("reward_model"),
                     algorithm: metrics["phase_seconds"].get(algorithm)}
    training: dict[str, Any] = {
        "method": {"ppo": "reward model + PPO (rlhf.job)",
                   "dpo": dpo_method(config)}[algorithm],
        "algorithm": algorithm,
        "feedback_window": window.as_dict(),
        "feedback_source": config.source,
        "dataset": dataset,
        "reward_model": metrics["reward_model"],
        "evaluation": evaluation,
        "hyperparameters": config.hyperparameters(),
        "phase_seconds": {**train_seconds, **timings, **seconds},
    }
    if vs_origin:
        training["vs_origin"] = vs_origin
    if replayed:
        training["replay"] = replayed
    history = metrics.get(algorithm) or []
    # A DPO run whose quiz check kept an earlier checkpoint publishes that step's weights: "steps"
    # and "final" describe what was published, "trained_steps" and "history" the whole run.
    kept = (metrics.get("dpo_quiz") or {}).get("kept_step") if algorithm == "dpo" else None
    published_history = history[:kept] if kept else history
    training[algorithm] = {"steps": len(published_history),
                           "final": published_history[-1] if published_history else None,
                           "trained_steps": len(history), "history": history}
    if algorithm == "dpo":
        training["dpo"]["heldout"] = metrics.get("dpo_heldout")
        training["dpo"]["quiz"] = metrics.get("dpo_quiz")
    extra_manifest = {"build": exported.build,
                      sampling.MANIFEST_KEY: sampling.defaults_for(base_manifest)}
    # the gate's outcome goes in the manifest: the registry refuses to promote a failed child
    published = registry.publish(export_dir, version, source=SOURCE, precision=exported.precision,
                                 execution_provider=exported.execution_provider, parent_version=base,
                                 quality=exported.quality, training=training, extra=extra_manifest)
    seconds["publish"] = time.perf_counter() - clock
    shutil.rmtree(work, ignore_errors=True)
    return {"algorithm": algorithm, "version": version, "path": str(published.path), "evaluation": evaluation,
            "vs_origin": vs_origin, "replay": replayed, "history": history,
            "training_quiz": metrics.get("dpo_quiz") if algorithm == "dpo" else None,
            "quality": {"exports": exported.scores, "gate": (exported.quality or {}).get("gate"),
                        "served_export": exported.build["variant"], "fidelity": exported.fidelity,
                        "eight_bit_layers": (exported.build.get("carried") or {}).get("eight_bit_layers")},
            "phase_seconds": {**train_seconds, **seconds}}


def rounds_between(registry: Registry, version: str, origin: str) -> int:
    """How many rounds made ``version`` from ``origin`` (0 when they are the same), following each
    manifest's ``parent_version``; a JobError when ``origin`` is not among its ancestors."""
    hops, current = 0, version
    while current != origin:
        parent = registry.manifest(current).get("parent_version")
        if not parent:
            raise JobError(f"{origin} is not an ancestor of {version}: a series goes on only from its own children")
        current, hops = parent, hops + 1
    return hops


def run_rounds(config: RLHFConfig, registry: Registry, rounds: int, base: str | None = None,
               dataset_root: Path | None = None, fresh: bool = False, deployment: str = DEFAULT_DEPLOYMENT,
               label: Callable[[int, str], None] | None = None,
               clock: Callable[[], int] | None = None,
               serve: Callable[[int, str], None] | None = None,
               origin: str | None = None) -> list[dict[str, Any]]:
    """``rounds`` runs that build on each other: label -> train -> evaluate -> publish, round k + 1
    starting from round k's child (its first, PPO's under ``both``) and so reading only feedback
    newer than round k's window (``rlhf.data.window_since`` of the child's manifest).

    ``serve(k, version)`` runs before round k is labelled (:func:`announced_server`: the gateway
    then answers with round k's base, so its feedback describes the model round k starts from);
    ``label(k, version)`` runs before round k's training (the simulated labelers, or nothing);
    ``clock`` gives each round's window end (Unix ms; default now). Every round after the first
    also judges its child against the first round's base (``vs_origin``).

    ``origin`` goes on with a series an earlier run started there (``base`` one of its children):
    rounds are numbered on from it and every child is judged against it, so a series can take a
    round whenever enough new feedback came in, as a scheduled job does.
    """
    if rounds < 1:
        raise JobError("rounds must be >= 1")
    start = base or registry.current(deployment)
    if not start:
        raise JobError(f"deployment {deployment!r} has no current version in {registry.root}; pass --base")
    origin = origin or start
    done_before = rounds_between(registry, start, origin)
    reports: list[dict[str, Any]] = []
    current = start
    for k in range(done_before + 1, done_before + rounds + 1):
        try:
            if serve is not None:
                serve(k, current)
            clock_start = time.perf_counter()
            if label is not None:
                label(k, current)
            label_seconds = time.perf_counter() - clock_start
            report = run(config, registry, current, dataset_root, fresh, clock() if clock else None, deployment,
                         origin=origin)
        except JobError as exc:
            if not reports:
                raise
            done = ", ".join(r["version"] for r in reports)
            raise JobError(f"round {k} of {done_before + rounds}: {exc} "
                           f"(rounds {done_before + 1}-{k - 1} published {done})") from exc
        report.update(round=k, label_seconds=label_seconds, labelled_version=current if serve is not None else None)
        reports.append(report)
        log.info("round %d of %d published %s (parent %s)", k, done_before + rounds, report["version"], current)
        current = report["version"]
    return reports


def announced_server(registry: Registry, deployment: str = DEFAULT_DEPLOYMENT) -> Callable[[int, str], None]:
    """A ``serve`` hook of :func:`run_rounds` (``--serve-rounds``): serve round k's base fully
    through the announced rollout (``services.generation.updates``: registry pointer, then
    ``model.updates``), as ``make promote`` does. Without it, round 2's labellers would rank the
    answers of whatever the gateway serves (the first base: children are published, not
    promoted), and round 2 would learn about a model it does not start from (2026-12-03: round 2
    won 3/15/6 against its parent). A child that failed the quality gate is not served: the
    registry refuses it and the rounds stop there."""
    from rlhf.canary import AnnouncedRollout, CanaryError

    rollout = AnnouncedRollout(str(registry.root), deployment)

    def serve(k: int, version: str) -> None:
        if registry.current(deployment) == version and not registry.canary(deployment):
            return
        try:
            # Registry.set_current checks the gate again; checking first keeps its reason in the
            # message (the rollout CLI reports only "refused (exit 2)") and announces nothing.
            check_quality_gate(version, registry.manifest(version))
            rollout.promote(version)
        except (CanaryError, RegistryError) as exc:
            raise JobError(f"round {k} is to be labelled on {version}, which cannot be served: {exc}") from exc
        log.info("round %d: %s is served, for its labels", k, version)
    return serve


def shell_labeler(command: str) -> Callable[[int, str], None]:
    """A ``label`` hook of :func:`run_rounds` that runs ``command`` in a shell with the round
    (``RLHF_ROUND``) and the version it starts from (``RLHF_ROUND_BASE``) in its environment."""
    def label(k: int, version: str) -> None:
        log.info("round %d: labelling with %s", k, command)
        subprocess.run(command, shell=True, check=True,  # the operator's own command line
                       env={**os.environ, "RLHF_ROUND": str(k), "RLHF_ROUND_BASE": version})
    return label


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rlhf.job``; exits 2 when there is nothing to do or it cannot run."""
    parser = argparse.ArgumentParser(prog="python -m rlhf.job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None, help="start from this version (default: the deployment's current)")
    parser.add_argument("--deployment", default=DEFAULT_DEPLOYMENT)
    parser.add_argument("--registry", type=Path, default=None,
                        help="registry root (default $COLLOQUY_MODEL_REGISTRY or <cache>/registry)")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="comparison dataset (default FEEDBACK_DATASET_DIR, as the feedback sink)")
    parser.add_argument("--source", choices=data.SOURCES, default=None, help="feedback source (RLHF_SOURCE)")
    parser.add_argument("--algorithm", choices=("ppo", "dpo", "both"), default=None,
                        help="policy trainer(s) (RLHF_ALGORITHM); both publishes a PPO and a DPO child")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds that build on each other: each starts from the previous round's child")
    parser.add_argument("--label-command", default="",
                        help="shell command run before each round (e.g. the simulated labelers); it gets "
                             "RLHF_ROUND and RLHF_ROUND_BASE in its environment")
    parser.add_argument("--serve-rounds", action="store_true",
                        help="before each round's labels, serve that round's base (the previous round's "
                             "child, if it passed the quality gate) through the announced rollout, so the "
                             "labels describe the model the round starts from; the last round's parent "
                             "stays served")
    parser.add_argument("--origin", default=None,
                        help="go on with the series of rounds that started from this version (--base, or the "
                             "served version, is one of its children): rounds are numbered on and every "
                             "child is also judged against it")
    parser.add_argument("--fresh", action="store_true", help="discard an unfinished run instead of resuming it")
    replay_args = parser.add_argument_group("replay evaluation (rlhf.replay): logged prompts re-run on each "
                                            "candidate and on the served version before publishing")
    replay_args.add_argument("--replay", action="store_true", default=None, help="turn it on (RLHF_REPLAY)")
    replay_args.add_argument("--replay-hours", type=float, default=None,
                             help="the window: turns of the last H hours before the run (RLHF_REPLAY_HOURS)")
    replay_args.add_argument("--replay-since", default=None,
                             help="the window: turns since this ISO 8601 time, e.g. 2026-12-01T08:00:00Z "
                                  "(RLHF_REPLAY_SINCE; overrides --replay-hours)")
    replay_args.add_argument("--replay-limit", type=int, default=None,
                             help="at most N distinct prompts, the newest (RLHF_REPLAY_LIMIT)")
    replay_args.add_argument("--replay-exclude-simulated", action="store_true", default=None,
                             help="leave out conversations the simulated labelers ranked "
                                  "(RLHF_REPLAY_EXCLUDE_SIMULATED)")
    replay_args.add_argument("--replay-store", default=None,
                             help="conversation store URL (RLHF_REPLAY_STORE; default DATABASE_URL or "
                                  "CONVERSATION_DB, as the conversation service)")
    canary_args = parser.add_argument_group("gated canary (rlhf.canary): after publishing, serve the last "
                                            "child beside the stable version, then promote or roll it back")
    canary_args.add_argument("--canary", type=int, default=0, metavar="PERCENT",
                             help="serve the last round's child, if it passed the quality gate and the replay "
                                  "evaluation, to PERCENT (1..99) of conversations, compare it with the stable "
                                  "version in Prometheus, then promote or roll it back; 0 (default): publish only")
    canary_args.add_argument("--canary-watch", type=float, default=None, metavar="S",
                             help="seconds to watch the canary before deciding (default RLHF_CANARY_WATCH_S)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlhf.report import job_markdown
    from services.common.config import ConfigError

    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if not 0 <= args.canary <= 99:
        parser.error(f"--canary must be 0 (off) or 1..99 percent of conversations, not {args.canary}")
    if args.canary_watch is not None and (not args.canary_watch > 0 or not args.canary):
        parser.error("--canary-watch needs --canary and a number of seconds > 0")
    if args.replay_hours is not None and not args.replay_hours > 0:
        parser.error(f"--replay-hours must be > 0, not {args.replay_hours}")
    if args.replay_limit is not None and args.replay_limit < 1:
        parser.error(f"--replay-limit must be >= 1, not {args.replay_limit}")
    if args.replay_since is not None:
        from rlhf.replay import parse_time

        try:
            parse_time(args.replay_since)
        except ValueError as exc:
            parser.error(f"--replay-since: {exc}")
    overrides = {k: v for k, v in (("source", args.source), ("algorithm", args.algorithm)) if v}
    overrides.update({k: v for k, v in (("replay", args.replay), ("replay_hours", args.replay_hours),
                                         ("replay_since", args.replay_since), ("replay_limit", args.replay_limit),
                                         ("replay_exclude_simulated", args.replay_exclude_simulated),
                                         ("replay_store", args.replay_store)) if v is not None})
    try:
        config = load_config(**overrides)
        registry = Registry(args.registry)
        reports = run_rounds(config, registry, args.rounds, args.base, args.dataset, args.fresh,
                             args.deployment, shell_labeler(args.label_command) if args.label_command else None,
                             serve=announced_server(registry, args.deployment) if args.serve_rounds else None,
                             origin=args.origin)
    except (ConfigError, JobError, RegistryError, subprocess.CalledProcessError) as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return 2
    print(job_markdown(reports))
    served = registry.current(args.deployment)
    for report in reports:
        for child in report["children"].values():
            print(f"published {child['version']} (served, for the next round's labels)" if child["version"] == served
                  else f"published {child['version']} (not promoted: "
                       f"python -m model.registry promote {args.deployment} {child['version']})")
    if args.canary:
        return _canary(args, reports[-1])
    return 0


def _canary(args: argparse.Namespace, report: dict[str, Any]) -> int:
    """``--canary``: the last round's first child goes to a gated canary (``rlhf.canary``)."""
    from rlhf.canary import CanaryError, gated_canary
    from rlhf.config import load_canary_config
    from services.common.config import ConfigError

    try:
        cfg = load_canary_config(**({"watch_s": args.canary_watch} if args.canary_watch else {}))
        child = next(iter(report["children"].values()))
        result = gated_canary(Registry(args.registry), args.deployment, child["version"], args.canary, cfg, child)
    except (ConfigError, CanaryError, RegistryError) as exc:
        print(f"rlhf: canary: {exc}", file=sys.stderr)
        return 2
    print(f"canary {child['version']}: {result['outcome']}: " + "; ".join(result["reasons"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
