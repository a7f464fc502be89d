"""Incremental build steps: skip work whose inputs have not changed.

Each step writes its output directory atomically (build in a sibling temp dir,
then rename) together with ``.stamp.json``, which records the inputs' hashes and
the sha256 of every output file. A step is up to date when the stamp's inputs
equal the current inputs and every recorded output file is present with its
recorded size, so a no-op rebuild reads a few small JSON files and hashes
nothing large.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.hashing import digest_json, hash_tree

STAMP = ".stamp.json"


def read_stamp(out_dir: Path) -> dict[str, Any] | None:
    """The step's stamp, or None when absent or unreadable."""
    try:
        return json.loads((out_dir / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def outputs_present(out_dir: Path, outputs: dict[str, dict[str, Any]]) -> bool:
    """Every recorded output file exists with its recorded size."""
    for rel, info in outputs.items():
        path = out_dir / rel
        try:
            if path.stat().st_size != info["size"]:
                return False
        except OSError:
            return False
    return True


def up_to_date(out_dir: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The stamp when ``out_dir`` was built from exactly ``inputs`` and is intact."""
    stamp = read_stamp(out_dir)
    if stamp and stamp.get("inputs_digest") == digest_json(inputs) and outputs_present(
            out_dir, stamp.get("outputs", {})):
        return stamp
    return None


def log(message: str) -> None:
    """Progress lines go to stderr so stdout stays machine-readable."""
    print(message, file=sys.stderr, flush=True)


def run_step(name: str, out_dir: Path, inputs: dict[str, Any],
             action: Callable[[Path], None], force: bool = False) -> dict[str, Any]:
    """Run ``action(tmp_dir)`` unless ``out_dir`` is up to date; return the stamp.

    The stamp's ``outputs`` map is ``{relpath: {"sha256", "size"}}`` and its
    ``outputs_digest`` identifies the result, so the next step can take it as
    an input without rehashing large files.
    """
    stamp = None if force else up_to_date(out_dir, inputs)
    if stamp is not None:
        log(f"[{name}] up to date")
        return stamp
    log(f"[{name}] building -> {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        action(tmp)
        outputs = hash_tree(tmp, ignore=frozenset({STAMP}))
        stamp = {
            "step": name,
            "inputs": inputs,
            "inputs_digest": digest_json(inputs),
            "outputs": outputs,
            "outputs_digest": digest_json(outputs),
        }
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n",
                                 encoding="utf-8")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[{name}] done")
    return stamp
