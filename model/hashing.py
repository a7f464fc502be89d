"""Content hashes for files and directory trees.

Stamps, manifests and the registry all identify content by sha256, so the same
helpers are shared to keep their formats identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file, streamed so large weights never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(root: Path, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Relative POSIX paths of regular files under ``root``, sorted for stable output."""
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            rel = path.relative_to(root).as_posix()
            if rel not in ignore:
                out.append(rel)
    return out


def hash_tree(root: Path, ignore: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """``{relpath: {"sha256": ..., "size": ...}}`` for every file under ``root``."""
    return {
        rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
        for rel in list_files(root, ignore)
    }


def digest_json(value: Any) -> str:
    """sha256 of a JSON value in canonical form: the identity of a set of inputs."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
