"""Model rollouts: which version(s) generation serves, and how a ModelUpdate changes that.

No I/O here. The durable state lives in the model registry (the deployment's pointer is the
stable version; a canary file names a second version and its traffic share); a `model.updates`
event tells running replicas to apply it. A canary share is decided per *conversation* (a hash
bucket), so every turn of one conversation is answered by one version and feedback compares
like with like.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

ACTIONS = ("promote", "rollback")


class InvalidUpdate(ValueError):
    """A ModelUpdate that cannot be applied (poison: it goes to the dead-letter topic)."""


@dataclasses.dataclass(frozen=True)
class RolloutState:
    version: str  # the stable version: everything not in the canary share
    canary_version: str = ""
    canary_percent: int = 0  # 0..99; 100 is a full switch, not a canary

    def __post_init__(self) -> None:
        if not self.version:
            raise InvalidUpdate("a rollout needs a stable version")
        if not 0 <= self.canary_percent <= 99:
            raise InvalidUpdate(f"canary_percent {self.canary_percent} is outside 0..99")
        if bool(self.canary_version) != bool(self.canary_percent):
            raise InvalidUpdate("a canary needs both a version and a share above 0")

    def user_config(self) -> dict[str, Any]:
        """The Serve deployment's user_config (Deployment.reconfigure reads it)."""
        return {"model_version": self.version, "canary_version": self.canary_version,
                "canary_percent": self.canary_percent}

    @classmethod
    def from_user_config(cls, cfg: dict[str, Any]) -> RolloutState:
        return cls(str(cfg.get("model_version") or ""), str(cfg.get("canary_version") or ""),
                   int(cfg.get("canary_percent") or 0))


def apply(state: RolloutState, action: str, version: str, canary_percent: int) -> RolloutState:
    """The state after an update. promote with 1..99 starts (or re-weights) a canary of `version`;
    promote with 100 (or 0, proto's default) switches fully; rollback serves `version` (the
    parent) alone."""
    if action not in ACTIONS:
        raise InvalidUpdate(f"action {action!r} is not one of {', '.join(ACTIONS)}")
    if not version:
        raise InvalidUpdate("the update names no version")
    if not 0 <= canary_percent <= 100:
        raise InvalidUpdate(f"canary_percent {canary_percent} is outside 0..100")
    if action == "rollback" or canary_percent in (0, 100) or version == state.version:
        return RolloutState(version)
    return RolloutState(state.version, version, canary_percent)


def bucket(key: str) -> int:
    """0..99, stable across processes and restarts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 100


def in_canary(state: RolloutState, key: str) -> bool:
    return bool(state.canary_version) and bucket(key) < state.canary_percent
