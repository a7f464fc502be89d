"""The committed RLHF recipes name only variables the job reads, and `make`'s way of sourcing one
(``set -a && . ./recipe``) reaches the job's config: a typo in a recipe would otherwise be a silent
default."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "rlhf" / "recipes").glob("*.env"))
READ_RE = re.compile(r"""env\(\s*["'](RLHF_[A-Z0-9_]+)["']""")


def settings(recipe: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in recipe.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def variables_read() -> set[str]:
    return {name for path in (ROOT / "rlhf").glob("*.py") for name in READ_RE.findall(path.read_text(encoding="utf-8"))}


def test_there_is_a_recipe() -> None:
    assert RECIPES, "rlhf/recipes/*.env is empty"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_setting_is_a_variable_the_job_reads(recipe: Path) -> None:
    unknown = sorted(set(settings(recipe)) - variables_read())
    assert not unknown, f"{recipe.name} sets variables no rlhf module reads: {unknown}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_sourced_as_make_does_it_reaches_the_config(recipe: Path) -> None:
    probe = ("import dataclasses, json; from rlhf.config import load_config; "
             "print(json.dumps(dataclasses.asdict(load_config())))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    script = f'set -a && . "./{recipe.relative_to(ROOT)}" && set +a && "{sys.executable}" -c "{probe}"'
    out = subprocess.run(["sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    config = json.loads(out.strip().splitlines()[-1])
    expected = {"RLHF_DPO_LR": ("dpo_lr", float), "RLHF_TRAIN_LAYERS": ("train_layers", int),
                "RLHF_ALGORITHM": ("algorithm", str)}
    for key, (field, kind) in expected.items():
        if key in settings(recipe):
            assert config[field] == kind(settings(recipe)[key]), (key, config[field])
