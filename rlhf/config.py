"""The RLHF job's configuration: one frozen dataclass, every field overridable by environment.

Same loader as the services (``services.common.config``): a bad value stops the job before it
starts, with one line naming the variable. Defaults suit the real 135M model on a small
machine; the integration test shrinks them for the tiny model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from services.common.config import ConfigError, env, load, positive


def _fraction(value: float) -> bool:
    return 0.0 <= value <= 1.0


def extrapolation_factors(text: str) -> list[float]:
    """``RLHF_DPO_EXTRAPOLATE``'s factors ("1.5,2,2.5"), in order; ValueError unless each is a number > 1."""
    factors = [float(part) for part in text.split(",") if part.strip()]
    if any(not f > 1.0 for f in factors):  # also refuses nan
        raise ValueError(f"extrapolation factors must be > 1: {text!r}")
    return factors


def _iso_time(value: str) -> Any:
    from rlhf.replay import parse_time

    return parse_time(value)


def _parses(parse: Callable[[str], Any]) -> Callable[[str], bool]:
    """A config check: ``parse`` takes the value without a ValueError."""

    def check(value: str) -> bool:
        try:
            parse(value)
        except ValueError:
            return False
        return True

    return check


@dataclasses.dataclass(frozen=True)
class RLHFConfig:
    """Hyperparameters, the KL bound, data selection and the Ray Train workers."""

    # Data
    source: str = env("RLHF_SOURCE", "all", check=lambda v: v in {"simulated", "human", "all"},
                      hint="simulated, human or all")
    heldout_percent: int = env("RLHF_HELDOUT_PERCENT", 20, check=lambda v: 0 <= v < 100, hint="0..99")
    min_comparisons: int = env("RLHF_MIN_COMPARISONS", 4, check=lambda v: v >= 1, hint=">= 1")
    max_prompt_tokens: int = env("RLHF_MAX_PROMPT_TOKENS", 256, check=lambda v: v >= 8, hint=">= 8")
    max_answer_tokens: int = env("RLHF_MAX_ANSWER_TOKENS", 96, check=lambda v: v >= 4, hint=">= 4")
    seed: int = env("RLHF_SEED", 0)
    # Train only the top N decoder layers (+ final norm and the heads) of the reward model and the
    # policy; 0 trains every weight. A CPU-sized setting for small machines.
    train_layers: int = env("RLHF_TRAIN_LAYERS", 0, check=lambda v: v >= 0, hint=">= 0 (0: all)")
    # Learning rate of the new scalar heads (reward, value); 0: the model's own (RLHF_RM_LR, RLHF_LR)
    head_lr: float = env("RLHF_HEAD_LR", 0.0, check=lambda v: v >= 0, hint=">= 0")
    # Reward model
    rm_epochs: int = env("RLHF_RM_EPOCHS", 2, check=lambda v: v >= 1, hint=">= 1")
    rm_batch_size: int = env("RLHF_RM_BATCH_SIZE", 4, check=lambda v: v >= 1, hint=">= 1 prompts")
    rm_lr: float = env("RLHF_RM_LR", 1e-5, check=positive, hint="> 0")
    # Which policy trainer(s) run on the comparisons: ppo (reward model + PPO), dpo (Direct
    # Preference Optimization against the frozen parent), or both (two children, one report)
    algorithm: str = env("RLHF_ALGORITHM", "ppo", check=lambda v: v in {"ppo", "dpo", "both"},
                         hint="ppo, dpo or both")
    # DPO: beta (strength of the pull back to the parent), passes over the comparisons, prompts per
    # batch, learning rate
    dpo_beta: float = env("RLHF_DPO_BETA", 0.1, check=positive, hint="> 0")
    dpo_epochs: int = env("RLHF_DPO_EPOCHS", 2, check=lambda v: v >= 1, hint=">= 1")
    dpo_batch_size: int = env("RLHF_DPO_BATCH_SIZE", 4, check=lambda v: v >= 1, hint=">= 1 prompts")
    dpo_lr: float = env("RLHF_DPO_LR", 1e-6, check=positive, hint="> 0")
    # Weight of the best answers' per-token NLL added to DPO's loss (RPO; rlhf.dpo); 0: plain DPO
    dpo_nll: float = env("RLHF_DPO_NLL", 0.0, check=lambda v: v >= 0, hint=">= 0")
    # Weight of DPO's pairwise term; 0 with RLHF_DPO_NLL > 0 leaves only the best answers' NLL:
    # rejection-sampling fine-tuning (Llama 2's rounds before PPO), which pushes no answer down
    dpo_pairwise: float = env("RLHF_DPO_PAIRWISE", 1.0, check=lambda v: v >= 0, hint=">= 0")
    # Weight of the anchor term (rlhf.dpo.anchor_kl): KL from the parent's next-token distributions
    # on its greedy answers to the `anchor` questions of rlhf/prompts.yaml, a batch of them each
    # step; 0: off. Holds the policy where it was on questions the round does not train on.
    dpo_anchor: float = env("RLHF_DPO_ANCHOR", 0.0, check=lambda v: v >= 0, hint=">= 0")
    # Knowledge checks during DPO (rlhf.quiz): every N steps (0: off) the quality quiz scores the
    # policy, and the run keeps its last checkpoint within RLHF_DPO_QUIZ_POINTS of the parent's
    # score. 1.5 points, not the gate's 2: on the 184-question quiz that is 2 questions lost, and
    # the 4-bit export of a child has answered one more or one fewer than its own float32 weights
    # (bench/results/rlhf_rounds_real.md), so a kept checkpoint still passes the export's gate.
    dpo_quiz_every: int = env("RLHF_DPO_QUIZ_EVERY", 0, check=lambda v: v >= 0, hint=">= 0 steps (0: off)")
    dpo_quiz_points: float = env("RLHF_DPO_QUIZ_POINTS", 1.5, check=lambda v: v >= 0, hint=">= 0 points")
    # Which checkpoint a DPO run with quiz checks keeps: "quiz", the last one within the points;
    # "validation", among those, the one with most rule wins against the parent on the validation
    # questions of rlhf/prompts.yaml (rlhf.validation), scored at the same steps.
    dpo_select: str = env("RLHF_DPO_SELECT", "quiz", check=lambda v: v in ("quiz", "validation"),
                          hint="quiz or validation")
    # Average the weights of every quiz checkpoint (steps N, 2N, ... and the last) and keep that mean
    # when it passes the quiz, instead of one checkpoint: trajectory averaging (SWA, LAWA, WARP's
    # averaging) keeps the direction the checkpoints share and cancels the step-to-step noise, which on
    # round 2 rewrote held-out greedy answers for the worse about as often as for the better.
    dpo_average: bool = env("RLHF_DPO_AVERAGE", False)
    # DPO's pairwise loss: "dpo" (log-ratio to the parent) or "simpo" (SimPO: beta x the answer's mean
    # log-probability per token, no reference, with margin RLHF_SIMPO_GAMMA; rlhf.dpo says why). SimPO
    # wants a larger RLHF_DPO_BETA than DPO (its paper: 2-2.5).
    dpo_loss: str = env("RLHF_DPO_LOSS", "dpo", check=lambda v: v in ("dpo", "simpo"), hint="dpo or simpo")
    simpo_gamma: float = env("RLHF_SIMPO_GAMMA", 1.25, check=lambda v: v >= 0, hint=">= 0")
    # ExPO (Zheng et al., 2024): after a run that chose its checkpoint on the validation questions, try
    # parent + a x (kept - parent) on the trained weights for each factor a listed, each quizzed and
    # scored on the validation questions like a checkpoint, and keep the one with most validation wins
    # within the quiz points (the kept checkpoint, a = 1, competes). A round that moved little may have
    # moved the right way: extrapolated x 2.5, 2026-12-07's SimPO round 2 won 67/31/44 against its parent
    # on 142 new held-out questions where the child itself won 45/57/40, but its exported build failed the quiz
    # gate (77.7 against 79.9; bench/results/rlhf_rounds_real.md).
    # Empty: off.
    dpo_extrapolate: str = env("RLHF_DPO_EXTRAPOLATE", "", check=_parses(extrapolation_factors),
                               hint="comma-separated factors > 1, e.g. 1.5,2,2.5,3 (empty: off)")
    # PPO
    ppo_steps: int = env("RLHF_PPO_STEPS", 20, check=lambda v: v >= 1, hint=">= 1")
    rollout_batch_size: int = env("RLHF_ROLLOUT_BATCH_SIZE", 8, check=lambda v: v >= 1, hint=">= 1")
    ppo_epochs: int = env("RLHF_PPO_EPOCHS", 4, check=lambda v: v >= 1, hint=">= 1")
    minibatch_size: int = env("RLHF_MINIBATCH_SIZE", 4, check=lambda v: v >= 1, hint=">= 1")
    lr: float = env("RLHF_LR", 1e-6, check=positive, hint="> 0")
    kl_coef: float = env("RLHF_KL_COEF", 0.05, check=lambda v: v >= 0, hint=">= 0")
    # The per-update trust region: a rollout's PPO epochs stop once approx KL(old || new) passes it
    # (per token; the bound on the distance to the parent is kl_bound below).
    target_kl: float = env("RLHF_TARGET_KL", 0.1, check=positive, hint="> 0")
    # The bound on the policy's KL to its parent (the frozen reference), in nats per answer: PPO
    # stops before an update once a rollout's mean KL(policy || reference) passes it, and the
    # evaluation checks the child's KL to its parent on the held-out prompts against it.
    kl_bound: float = env("RLHF_KL_BOUND", 6.0, check=positive, hint="> 0 nats per answer")
    clip_range: float = env("RLHF_CLIP_RANGE", 0.2, check=lambda v: 0 < v < 1, hint="0..1")
    clip_range_value: float = env("RLHF_CLIP_RANGE_VALUE", 0.2, check=positive, hint="> 0")
    vf_coef: float = env("RLHF_VF_COEF", 0.1, check=lambda v: v >= 0, hint=">= 0")
    ent_coef: float = env("RLHF_ENT_COEF", 0.0, check=lambda v: v >= 0, hint=">= 0")
    gamma: float = env("RLHF_GAMMA", 1.0, check=_fraction, hint="0..1")
    lam: float = env("RLHF_LAM", 0.95, check=_fraction, hint="0..1")
    max_grad_norm: float = env("RLHF_MAX_GRAD_NORM", 1.0, check=positive, hint="> 0")
    max_new_tokens: int = env("RLHF_MAX_NEW_TOKENS", 48, check=lambda v: v >= 1, hint=">= 1")
    checkpoint_every: int = env("RLHF_CHECKPOINT_EVERY", 5, check=lambda v: v >= 1, hint=">= 1 steps")
    temperature: float = env("RLHF_TEMPERATURE", 1.0, check=positive, hint="> 0")
    # Ray Train
    num_workers: int = env("RLHF_NUM_WORKERS", 1, check=lambda v: v >= 1, hint=">= 1")
    cpus_per_worker: int = env("RLHF_CPUS_PER_WORKER", 1, check=lambda v: v >= 1, hint=">= 1")
    use_gpu: str = env("RLHF_USE_GPU", "auto", check=lambda v: v in {"auto", "true", "false"},
                       hint="auto, true or false")
    ray_address: str = env("RLHF_RAY_ADDRESS", "", hint="empty starts a local Ray")
    ray_num_cpus: int = env("RLHF_RAY_NUM_CPUS", 0, check=lambda v: v >= 0,
                            hint="CPUs for a local Ray (0: all)")
    # Evaluation and metrics
    eval_max_new_tokens: int = env("RLHF_EVAL_MAX_NEW_TOKENS", 48, check=lambda v: v >= 1, hint=">= 1")
    # Answers sampled per held-out prompt from parent and child (reward model and KL estimates; 0: skip)
    eval_samples: int = env("RLHF_EVAL_SAMPLES", 4, check=lambda v: v >= 0, hint=">= 0")
    pushgateway_url: str = env("PUSHGATEWAY_URL", "")
    # Replay evaluation (rlhf.replay): logged prompts of the conversation store re-run on each
    # candidate and on the served version before publishing. Window: the last RLHF_REPLAY_HOURS
    # before the run, or from RLHF_REPLAY_SINCE (ISO 8601, UTC when no zone) when set; the newest
    # RLHF_REPLAY_LIMIT distinct prompts in it.
    replay: bool = env("RLHF_REPLAY", False)
    replay_hours: float = env("RLHF_REPLAY_HOURS", 24.0, check=positive, hint="> 0 hours")
    replay_since: str = env("RLHF_REPLAY_SINCE", "", check=lambda v: not v or _parses(_iso_time)(v),
                            hint="an ISO 8601 time such as 2026-12-01T08:00:00Z")
    replay_limit: int = env("RLHF_REPLAY_LIMIT", 64, check=lambda v: v >= 1, hint=">= 1 prompts")
    replay_exclude_simulated: bool = env("RLHF_REPLAY_EXCLUDE_SIMULATED", False)
    # The conversation store to read; empty: the conversation service's own (DATABASE_URL, else the
    # SQLite file CONVERSATION_DB)
    replay_store: str = env("RLHF_REPLAY_STORE", "")
    # The replay fails when the candidate's mean rule score is more than this below the served
    # version's, or its answers' block rate more than this fraction above the served version's.
    replay_rule_margin: float = env("RLHF_REPLAY_RULE_MARGIN", 0.0, check=lambda v: v >= 0, hint=">= 0")
    replay_max_block_increase: float = env("RLHF_REPLAY_MAX_BLOCK_INCREASE", 0.0, check=_fraction, hint="0..1")
    # The moderation service that judges the replayed answers (as the gateway's MODERATION_ADDR);
    # empty: not measured, and the replay does not pass.
    moderation_addr: str = env("MODERATION_ADDR", "")

    def __post_init__(self) -> None:
        if self.dpo_pairwise == 0 and self.dpo_nll == 0:
            raise ConfigError("RLHF_DPO_PAIRWISE=0 needs RLHF_DPO_NLL > 0: with both at 0 DPO's trainer has no loss")
        if self.dpo_extrapolate and (self.dpo_select != "validation" or self.dpo_quiz_every == 0):
            raise ConfigError("RLHF_DPO_EXTRAPOLATE needs RLHF_DPO_SELECT=validation and RLHF_DPO_QUIZ_EVERY > 0: "
                              "an extrapolated policy is kept on its validation wins within the quiz points")

    def gpu(self) -> bool:
        """Train on GPUs when asked, or (``auto``) when torch sees one."""
        if self.use_gpu == "auto":
            import torch

            return torch.cuda.is_available()
        return self.use_gpu == "true"

    def hyperparameters(self) -> dict[str, Any]:
        """Everything that shapes the trained weights (recorded in the manifest)."""
        skip = {"ray_address", "ray_num_cpus", "pushgateway_url", "use_gpu", "eval_samples", "moderation_addr",
                *(f.name for f in dataclasses.fields(self) if f.name.startswith("replay"))}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclasses.dataclass(frozen=True)
class CanaryConfig:
    """The job's gated canary (``python -m rlhf.job --canary P``, ``rlhf.canary``): how long to
    watch, where Prometheus is, and how far the canary may fall behind the stable version.

    Kept apart from :class:`RLHFConfig` because none of it shapes the trained weights (that
    class's fields are recorded as the child's hyperparameters).
    """

    prometheus_url: str = env("PROMETHEUS_URL", "http://127.0.0.1:9090",
                              check=lambda v: v.startswith(("http://", "https://")), hint="http(s)://host:port")
    # Seconds the canary is watched before the decision (the job's --canary-watch overrides it)
    watch_s: float = env("RLHF_CANARY_WATCH_S", 1800.0, check=positive, hint="> 0 seconds")
    # Seconds after the canary starts that are not judged (its model loading, cold prefix cache):
    # the watch's window begins after them
    warmup_s: float = env("RLHF_CANARY_WARMUP_S", 120.0, check=lambda v: v >= 0, hint=">= 0 seconds")
    # Seconds between two looks at Prometheus (a failing check with enough samples rolls back at once)
    interval_s: float = env("RLHF_CANARY_INTERVAL_S", 60.0, check=positive, hint="> 0 seconds")
    # Times the watch is extended when too few samples arrived; then it rolls back (not proven)
    extensions: int = env("RLHF_CANARY_EXTENSIONS", 1, check=lambda v: v >= 0, hint=">= 0")
    # Samples each version needs before a check counts: finished requests (error rate, TTFT, output
    # verdicts) and thumbs (ratings; 0 leaves the thumbs-up check out)
    min_requests: int = env("RLHF_CANARY_MIN_REQUESTS", 50, check=lambda v: v >= 1, hint=">= 1")
    min_ratings: int = env("RLHF_CANARY_MIN_RATINGS", 20, check=lambda v: v >= 0, hint=">= 0 (0: no thumbs check)")
    # Tolerances: how much worse than the stable version the canary may be
    max_error_rate_increase: float = env("RLHF_CANARY_MAX_ERROR_RATE_INCREASE", 0.01, check=_fraction,
                                         hint="0..1 (absolute, e.g. 0.01 = one point)")
    # A rate (errors, blocks, thumbs up) past its limit fails only at this one-sided confidence
    confidence: float = env("RLHF_CANARY_CONFIDENCE", 0.95, check=lambda v: 0.5 <= v < 1, hint="0.5..1")
    ttft_ratio: float = env("RLHF_CANARY_TTFT_RATIO", 1.25, check=lambda v: v >= 1, hint=">= 1")
    ttft_slack_s: float = env("RLHF_CANARY_TTFT_SLACK_S", 0.05, check=lambda v: v >= 0, hint=">= 0 seconds")
    max_block_rate_increase: float = env("RLHF_CANARY_MAX_BLOCK_RATE_INCREASE", 0.02, check=_fraction,
                                         hint="0..1 (absolute)")
    max_thumbs_up_drop: float = env("RLHF_CANARY_MAX_THUMBS_UP_DROP", 0.10, check=_fraction,
                                    hint="0..1 (absolute)")
    # Which thumbs count: human, simulated or all
    thumbs_source: str = env("RLHF_CANARY_THUMBS_SOURCE", "all",
                             check=lambda v: v in {"human", "simulated", "all"}, hint="human, simulated or all")


def load_canary_config(**overrides: Any) -> CanaryConfig:
    """The canary settings from the environment, then ``overrides`` (the job's flags, tests)."""
    return dataclasses.replace(load(CanaryConfig), **overrides)


def load_config(**overrides: Any) -> RLHFConfig:
    """The config from the environment, then ``overrides`` (tests and the CLI)."""
    return dataclasses.replace(load(RLHFConfig), **overrides)
