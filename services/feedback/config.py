"""Feedback sink configuration."""

from __future__ import annotations

import dataclasses
import os

from services.common.config import env

DEFAULTS = {"GRPC_PORT": "50055", "METRICS_PORT": "9106"}


@dataclasses.dataclass(frozen=True)
class FeedbackConfig:
    dataset_dir: str = env("FEEDBACK_DATASET_DIR",
                           os.path.join(os.environ.get("COLLOQUY_VAR", "var"), "feedback"))
