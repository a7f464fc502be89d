"""The job's Prometheus gauges, pushed to a Pushgateway (a batch job has no /metrics to scrape).

One registry per job process (not the services' global one); pushed under
``job="colloquy-rlhf"`` after every reported step when ``PUSHGATEWAY_URL`` is set. A push that
fails is logged and the training goes on: metrics must never stop a run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

JOB = "colloquy-rlhf"
log = logging.getLogger(__name__)

# metric key as reported to Ray Train -> gauge name
GAUGES = {
    "reward_mean": ("colloquy_rlhf_reward_mean", "Mean reward-model score of the step's rollouts"),
    "kl": ("colloquy_rlhf_kl", "Mean per-response KL(policy || reference) of the step's rollouts"),
    "entropy": ("colloquy_rlhf_entropy", "Mean per-token entropy of the policy on its rollouts"),
    "clip_fraction": ("colloquy_rlhf_clip_fraction", "Share of tokens whose PPO ratio was clipped"),
    "value_loss": ("colloquy_rlhf_value_loss", "Clipped value loss of the last PPO epoch"),
    "policy_loss": ("colloquy_rlhf_policy_loss", "Clipped surrogate policy loss of the last PPO epoch"),
    "approx_kl": ("colloquy_rlhf_approx_kl", "Approximate KL(old || new) of the last PPO epoch"),
    "reward_model_accuracy": ("colloquy_rlhf_reward_model_accuracy",
                              "Held-out pair accuracy of the reward model"),
    "reward_model_loss": ("colloquy_rlhf_reward_model_loss", "Pairwise loss of the reward model"),
    "step": ("colloquy_rlhf_step", "PPO step the job has reached"),
}


class JobMetrics:
    """Gauges for one job; :meth:`update` sets what a report carries and pushes."""

    def __init__(self, pushgateway_url: str = "") -> None:
        self.url = pushgateway_url
        self.registry = CollectorRegistry()
        self.gauges = {key: Gauge(name, doc, registry=self.registry) for key, (name, doc) in GAUGES.items()}
        self.phase_seconds = Gauge("colloquy_rlhf_phase_seconds", "Seconds each phase of the job took",
                                   ["phase"], registry=self.registry)

    def update(self, values: Mapping[str, float], phase_seconds: Mapping[str, float] | None = None) -> None:
        """Set every known key of ``values`` (others are ignored), then push."""
        for key, value in values.items():
            gauge = self.gauges.get(key)
            if gauge is not None and value is not None:
                gauge.set(float(value))
        for phase, seconds in (phase_seconds or {}).items():
            self.phase_seconds.labels(phase).set(float(seconds))
        self.push()

    def push(self) -> None:
        if not self.url:
            return
        try:
            push_to_gateway(self.url, job=JOB, registry=self.registry, timeout=5)
        except Exception as exc:  # an unreachable gateway must not fail the run
            log.warning("pushgateway %s: %s", self.url, exc)
