"""The model registry: checksummed model versions on disk and per-deployment pointers.

Layout under the root (``$COLLOQUY_MODEL_REGISTRY``, default
``${COLLOQUY_CACHE:-~/.cache/colloquy}/registry``)::

    versions/<version>/manifest.json   what the version is and the sha256 of every file
    versions/<version>/...             the model files (model.onnx, genai_config.json, ...)
    current/<deployment>.json          which version a deployment serves, with history
    current/<deployment>.canary        the canary being served (version, percent), if any
    current/<deployment>.canary-log  every automatic canary's decision and why (rlhf.canary)
    .staging-*/                        publishes (or prunes) in progress (never read, swept by ``gc``)

Why this shape:

* Publishing copies into a staging directory inside the root, fsyncs, and
  renames it into ``versions/`` in one ``os.rename``: readers see a whole
  version or none, and a crash leaves only a ``.staging-*`` directory.
* ``load`` verifies every file's sha256 (default on) so a truncated copy or a
  flipped bit is refused before ONNX Runtime ever reads it.
* Pointers are small JSON files replaced atomically (temp file + rename) under
  a lock, so the generation service can poll one file; ``history`` makes
  ``rollback`` a pointer move, never a copy.

CLI: ``python -m model.registry [--root DIR] list|show V|current D|promote D V [--canary P]|
rollback D|verify V|prune [--keep N] [--min-age-hours H] [--dry-run]|gc``.
``promote`` and ``rollback`` are the rollout of ``make promote`` and
``make rollback`` (``services.generation.updates``): the registry records it and a
``ModelUpdate`` on ``model.updates`` tells the running replicas, so no path moves the pointer
without them hearing of it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.hashing import CHUNK, list_files, sha256_file
from model.paths import registry_root

SCHEMA = 1
MANIFEST = "manifest.json"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_DEPLOYMENT = "generation"
REQUIRED_KEYS = ("schema", "version", "parent_version", "source", "precision",
                 "execution_provider", "files", "created_at")


class RegistryError(Exception):
    """Base class of every registry failure."""


class InvalidName(RegistryError):
    """A version or deployment name that is not a safe directory/file name."""


class VersionNotFound(RegistryError):
    """No such version in the registry."""


class VersionExists(RegistryError):
    """Publishing a version name that is already taken (versions are immutable)."""


class CorruptVersion(RegistryError):
    """A version whose files do not match its manifest (or that has no manifest)."""


class PointerError(RegistryError):
    """A deployment pointer that is missing, unreadable, or cannot move as asked."""


class FailedQualityGate(PointerError):
    """A version whose manifest records a failed quality gate cannot be served (promote/canary)."""


def check_quality_gate(version: str, manifest: Mapping[str, Any]) -> None:
    """Refuse a version whose recorded quality gate failed: an RLHF child scored more than the
    gate's points below its own float32 weights (the export lost what training gained) or below
    its parent (training cost knowledge)."""
    gate = (manifest.get("quality") or {}).get("gate")
    if isinstance(gate, Mapping) and gate.get("passed") is False:
        against = f"{gate.get('reference')} {gate.get('reference_pct')}%"
        if gate.get("passed_vs_parent") is False:
            against = f"its parent {gate.get('parent_pct')}%"
        raise FailedQualityGate(
            f"version {version!r} failed the quality gate ({gate.get('score_pct')}% against "
            f"{against}, at most {gate.get('points')} points below allowed): it cannot be promoted")


@dataclass(frozen=True)
class ModelVersion:
    """A loaded version: where its files are and what its manifest says."""

    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def parent_version(self) -> str | None:
        """The version this one was derived from (e.g. the RLHF starting point)."""
        return self.manifest.get("parent_version")


def utc_now(ago_s: float = 0.0) -> str:
    """ISO-8601 UTC timestamp with a ``Z``, second precision (``ago_s`` seconds ago); such
    timestamps compare correctly as strings."""
    return (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=ago_s)).replace(microsecond=0).isoformat().replace(
        "+00:00", "Z")


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not VERSION_RE.match(name):
        raise InvalidName(f"invalid {kind} name {name!r}: use letters, digits, '.', '_', '-'")
    return name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _copy_hashing(src: Path, dst: Path) -> dict[str, Any]:
    """Copy one file, fsync it, and return the sha256/size of the bytes written."""
    import hashlib

    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return {"sha256": digest.hexdigest(), "size": size}


class Registry:
    """A model registry rooted at one directory (see the module docstring)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else registry_root()
        self.versions_dir = self.root / "versions"
        self.current_dir = self.root / "current"

    # ---------------------------------------------------------------- versions
    def version_path(self, version: str) -> Path:
        """Directory of ``version`` (whether or not it exists)."""
        return self.versions_dir / _check_name("version", version)

    def exists(self, version: str) -> bool:
        """Whether ``version`` has been published (its manifest is present)."""
        return (self.version_path(version) / MANIFEST).is_file()

    def publish(self, src_dir: Path | str, version: str, *, source: str, precision: str,
                execution_provider: str, parent_version: str | None = None,
                quality: Mapping[str, Any] | None = None,
                training: Mapping[str, Any] | None = None,
                extra: Mapping[str, Any] | None = None) -> ModelVersion:
        """Copy every file of ``src_dir`` into a new immutable version, atomically.

        The files are hashed while copied (what is recorded is what landed),
        fsynced, the manifest is written last, and the staging directory is
        renamed into ``versions/``. Raises :class:`VersionExists` if the name
        is taken and :class:`VersionNotFound` if ``parent_version`` is unknown.
        """
        src = Path(src_dir)
        target = self.version_path(version)
        if parent_version is not None and not self.exists(parent_version):
            raise VersionNotFound(f"parent version {parent_version!r} is not in {self.root}")
        if target.exists():
            raise VersionExists(f"version {version!r} already exists in {self.root}")
        rels = [r for r in list_files(src) if not r.startswith(".") and r != MANIFEST]
        if not rels:
            raise RegistryError(f"{src} holds no files to publish")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            files: dict[str, Any] = {}
            for rel in rels:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                files[rel] = _copy_hashing(src / rel, staging / rel)
            manifest: dict[str, Any] = {
                "schema": SCHEMA,
                "version": version,
                "parent_version": parent_version,
                "source": source,
                "precision": precision,
                "execution_provider": execution_provider,
                "files": files,
                "created_at": utc_now(),
                "quality": dict(quality) if quality is not None else None,
            }
            if training is not None:
                manifest["training"] = dict(training)
            if extra:
                for key, value in extra.items():
                    manifest.setdefault(key, value)
            _write_atomic(staging / MANIFEST, _dump(manifest))
            for directory in sorted({(staging / r).parent for r in rels}, reverse=True):
                _fsync_dir(directory)
            try:
                os.rename(staging, target)
            except OSError as exc:  # a concurrent publish of the same name won the race
                if target.exists():
                    raise VersionExists(f"version {version!r} already exists") from exc
                raise
            _fsync_dir(self.versions_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return ModelVersion(version, target, manifest)

    def manifest(self, version: str) -> dict[str, Any]:
        """The manifest of ``version``, parsed and schema-checked (cheap: no hashing)."""
        path = self.version_path(version)
        if not path.is_dir():
            raise VersionNotFound(f"version {version!r} not found in {self.root}")
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CorruptVersion(f"version {version!r} has no manifest (half-written?)") from exc
        except (OSError, ValueError) as exc:
            raise CorruptVersion(f"version {version!r} has an unreadable manifest: {exc}") from exc
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise CorruptVersion(f"version {version!r} manifest lacks {missing}")
        if manifest["version"] != version:
            raise CorruptVersion(f"directory {version!r} holds manifest of {manifest['version']!r}")
        if manifest["schema"] != SCHEMA:
            raise CorruptVersion(f"version {version!r} has unknown schema {manifest['schema']}")
        return manifest

    def load(self, version: str, verify: bool = True) -> ModelVersion:
        """A version ready to serve; with ``verify`` (default) every file's sha256 is checked.

        Raises :class:`VersionNotFound` or :class:`CorruptVersion` (missing
        file, wrong size, checksum mismatch, file not in the manifest).
        """
        manifest = self.manifest(version)
        path = self.version_path(version)
        files: Mapping[str, Mapping[str, Any]] = manifest["files"]
        present = {r for r in list_files(path) if r != MANIFEST}
        unexpected = sorted(present - set(files))
        if unexpected:
            raise CorruptVersion(f"version {version!r} has files not in its manifest: {unexpected}")
        for rel, info in files.items():
            file = path / rel
            if not file.is_file():
                raise CorruptVersion(f"version {version!r} is missing {rel}")
            if file.stat().st_size != info["size"]:
                raise CorruptVersion(f"version {version!r}: {rel} has size {file.stat().st_size},"
                                     f" manifest says {info['size']}")
            if verify and sha256_file(file) != info["sha256"]:
                raise CorruptVersion(f"version {version!r}: checksum mismatch in {rel}")
        return ModelVersion(version, path, manifest)

    def annotate(self, version: str, updates: Mapping[str, Any]) -> dict[str, Any]:
        """Replace metadata of a published version (e.g. a re-run quality check), atomically.

        A version's files and identity never change: ``files``, ``version``,
        ``source``, ``precision``, ``execution_provider``, ``parent_version``,
        ``schema`` and ``created_at`` are refused. The manifest is rewritten
        with temp file + rename, so readers see the old or the new one.
        """
        frozen = set(REQUIRED_KEYS) & set(updates)
        if frozen:
            raise RegistryError(f"cannot change {sorted(frozen)} of published version {version!r}")
        manifest = self.manifest(version)
        manifest.update(updates)
        manifest["updated_at"] = utc_now()
        _write_atomic(self.version_path(version) / MANIFEST, _dump(manifest))
        return manifest

    def list_versions(self) -> list[str]:
        """Published version names, oldest first (half-written ones are skipped)."""
        if not self.versions_dir.is_dir():
            return []
        found = []
        for entry in self.versions_dir.iterdir():
            if entry.name.startswith(".") or not (entry / MANIFEST).is_file():
                continue
            try:
                created = self.manifest(entry.name)["created_at"]
            except RegistryError:
                continue
            found.append((created, entry.name))
        return [name for _, name in sorted(found)]

    def gc(self, older_than_s: float = 3600.0) -> list[Path]:
        """Remove staging leftovers of crashed publishes older than ``older_than_s``."""
        removed = []
        if not self.root.is_dir():
            return removed
        cutoff = time.time() - older_than_s
        for entry in self.root.iterdir():
            if entry.name.startswith(".staging-") and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed

    def protected(self) -> set[str]:
        """Versions that must stay: what every deployment serves, its canary, every version its
        history can roll back to, and the ancestors of all of these (``rollback`` falls back to
        a version's parent)."""
        keep: set[str] = set()
        for deployment in self.deployments():
            pointer = self.pointer(deployment) or {}
            canary = self.canary(deployment) or {}
            keep.update(v for v in (pointer.get("version"), canary.get("version"), *pointer.get("history", [])) if v)
        return self._with_ancestors(keep)

    def _with_ancestors(self, versions: set[str]) -> set[str]:
        keep = set(versions)
        todo = list(keep)
        while todo:
            try:
                parent = self.manifest(todo.pop()).get("parent_version")
            except RegistryError:
                continue
            if parent and parent not in keep:
                keep.add(parent)
                todo.append(parent)
        return keep

    def prune(self, keep: int = 2, min_age_s: float = 86400.0, dry_run: bool = False) -> list[str]:
        """Remove derived versions (those with a parent: RLHF children) that nothing serves or
        can roll back to, except the ``keep`` newest and any younger than ``min_age_s`` (a job
        still running may be training on, or about to promote, one of those).

        Each RLHF round publishes a child of several hundred MB and most are never promoted; base
        builds (no parent, ``make model``'s) are never removed. Under the pointer lock, so a
        promote cannot point at a version while it goes; a version is first renamed out of
        ``versions/`` (readers see it whole or not at all), then deleted. Returns the names.
        """
        cutoff = utc_now(ago_s=min_age_s)
        with self._locked():
            protected = self.protected()
            versions = self.list_versions()  # oldest first
            candidates = []
            for version in versions:
                manifest = self.manifest(version)
                if manifest.get("parent_version") and version not in protected:
                    candidates.append((version, manifest["created_at"]))
            doomed = [v for v, created in candidates[:max(0, len(candidates) - keep)] if created <= cutoff]
            # a kept child's parent stays too (round 2 of a job is trained from round 1's child)
            staying = self._with_ancestors(set(versions) - set(doomed))
            doomed = [v for v in doomed if v not in staying]
            if dry_run:
                return doomed
            for version in doomed:
                trash = self.root / f".staging-pruned-{version}-{uuid.uuid4().hex[:8]}"
                os.rename(self.version_path(version), trash)
                shutil.rmtree(trash, ignore_errors=True)
            if doomed:
                _fsync_dir(self.versions_dir)
        return doomed

    # ---------------------------------------------------------------- pointers
    def _pointer_path(self, deployment: str) -> Path:
        return self.current_dir / f"{_check_name('deployment', deployment)}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize pointer read-modify-write across processes."""
        self.current_dir.mkdir(parents=True, exist_ok=True)
        with open(self.current_dir / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def pointer(self, deployment: str) -> dict[str, Any] | None:
        """The pointer document of ``deployment``, or None when none is set."""
        path = self._pointer_path(deployment)
        try:
            pointer = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise PointerError(f"pointer {path} is unreadable: {exc}") from exc
        if not isinstance(pointer, dict) or "version" not in pointer:
            raise PointerError(f"pointer {path} has no version")
        return pointer

    def current(self, deployment: str = DEFAULT_DEPLOYMENT) -> str | None:
        """The version ``deployment`` serves, or None."""
        pointer = self.pointer(deployment)
        return pointer["version"] if pointer else None

    def _move(self, deployment: str, target: str, history: list[str], action: str,
              reason: str | None) -> dict[str, Any]:
        """Write ``deployment``'s pointer at ``target`` with ``history``; caller holds the lock."""
        if not self.exists(target):  # pruned since it was verified (prune holds the lock too)
            raise VersionNotFound(f"version {target!r} is not in {self.root}")
        pointer = self.pointer(deployment) or {}
        event = {"at": utc_now(), "action": action, "from": pointer.get("version"), "to": target}
        if reason:
            event["reason"] = reason
        new = {"deployment": deployment, "version": target, "history": history,
               "updated_at": event["at"], "events": [*pointer.get("events", []), event]}
        _write_atomic(self._pointer_path(deployment), _dump(new))
        return new

    def _forward_history(self, deployment: str, target: str) -> list[str]:
        pointer = self.pointer(deployment)
        if pointer is None:
            return []
        history = list(pointer.get("history", []))
        if pointer["version"] != target:
            history.append(pointer["version"])
        return history

    def set_current(self, deployment: str, version: str, verify: bool = True,
                    reason: str | None = None) -> dict[str, Any]:
        """Point ``deployment`` at ``version`` (moving forward; the old one joins history).

        The version is loaded (and by default checksum-verified) first, so a
        corrupt version can never become current.
        """
        _check_name("deployment", deployment)
        check_quality_gate(version, self.load(version, verify=verify).manifest)
        with self._locked():
            return self._move(deployment, version, self._forward_history(deployment, version),
                              "promote", reason)

    def set_current_if_unset(self, deployment: str, version: str,
                             verify: bool = True) -> bool:
        """Point ``deployment`` at ``version`` only if it has no pointer; True if it moved."""
        _check_name("deployment", deployment)
        self.load(version, verify=verify)
        with self._locked():
            if self.pointer(deployment) is not None:
                return False
            self._move(deployment, version, [], "initial", None)
            return True

    def rollback(self, deployment: str, verify: bool = True,
                 reason: str | None = None) -> dict[str, Any]:
        """Point ``deployment`` back at the version it served before.

        With no history left, falls back to the current version's
        ``parent_version``; raises :class:`PointerError` when neither exists.
        """
        with self._locked():
            pointer = self.pointer(deployment)
            if pointer is None:
                raise PointerError(f"deployment {deployment!r} has no current version")
            history = list(pointer.get("history", []))
            if history:
                target = history.pop()
            else:
                parent = self.manifest(pointer["version"]).get("parent_version")
                if not parent:
                    raise PointerError(f"deployment {deployment!r}: nothing to roll back to "
                                       f"(no history, {pointer['version']!r} has no parent)")
                target = parent
            self.load(target, verify=verify)
            return self._move(deployment, target, history, "rollback", reason)

    # ---------------------------------------------------------------- canaries
    def _canary_path(self, deployment: str) -> Path:
        return self.current_dir / f"{_check_name('deployment', deployment)}.canary"

    def canary(self, deployment: str = DEFAULT_DEPLOYMENT) -> dict[str, Any] | None:
        """{"version", "percent"} of the deployment's canary, or None."""
        try:
            doc = json.loads(self._canary_path(deployment).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise PointerError(f"canary of {deployment!r} is unreadable: {exc}") from exc
        return doc if doc.get("version") and doc.get("percent") else None

    def set_canary(self, deployment: str, version: str, percent: int, verify: bool = True) -> dict[str, Any]:
        """Serve ``version`` to ``percent``% (1..99) of conversations beside the current version."""
        if not 1 <= percent <= 99:
            raise PointerError(f"canary percent {percent} is outside 1..99")
        check_quality_gate(version, self.load(version, verify=verify).manifest)
        doc = {"deployment": deployment, "version": version, "percent": percent, "updated_at": utc_now()}
        with self._locked():
            if not self.exists(version):
                raise VersionNotFound(f"version {version!r} is not in {self.root}")
            _write_atomic(self._canary_path(deployment), _dump(doc))
        return doc

    def clear_canary(self, deployment: str = DEFAULT_DEPLOYMENT) -> None:
        with self._locked():
            self._canary_path(deployment).unlink(missing_ok=True)

    def _canary_log_path(self, deployment: str) -> Path:
        return self.current_dir / f"{_check_name('deployment', deployment)}.canary-log"

    def canary_log(self, deployment: str = DEFAULT_DEPLOYMENT) -> list[dict[str, Any]]:
        """Every recorded canary decision of ``deployment``, oldest first."""
        try:
            log = json.loads(self._canary_log_path(deployment).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise PointerError(f"canary log of {deployment!r} is unreadable: {exc}") from exc
        return list(log)

    def record_canary(self, deployment: str, version: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """Record a canary's outcome and reasons: appended to the deployment's canary log and to
        the ``canary`` list of ``version``'s manifest (so ``show V`` says why it was or was not
        promoted). Both files are replaced atomically under the pointer lock."""
        entry = {"at": utc_now(), "deployment": deployment, "version": version, **record}
        self.manifest(version)  # an unknown version is refused before anything is written
        with self._locked():
            _write_atomic(self._canary_log_path(deployment), _dump([*self.canary_log(deployment), entry]))
            past = self.manifest(version).get("canary") or []
            self.annotate(version, {"canary": [*past, entry]})
        return json.loads(_dump(entry))  # as recorded (tuples are lists)

    def deployments(self) -> list[str]:
        """Deployments that have a pointer."""
        if not self.current_dir.is_dir():
            return []
        return sorted(p.stem for p in self.current_dir.glob("*.json") if not p.name.startswith("."))


def _dump(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


# -------------------------------------------------------------------- CLI
def _cmd_list(reg: Registry, _: argparse.Namespace) -> int:
    serving: dict[str, list[str]] = {}
    for deployment in reg.deployments():
        version = reg.current(deployment)
        if version:
            serving.setdefault(version, []).append(deployment)
    rows = [("VERSION", "PRECISION", "EP", "QUALITY", "DECODE tok/s", "CREATED", "CURRENT")]
    for version in reg.list_versions():
        m = reg.manifest(version)
        q = m.get("quality") or {}
        score = f"{q['score']}/{q['total']}" if "score" in q else "-"
        measured = m.get("speed") or q  # the build's interleaved timing, else the check's
        speed = str(measured.get("decode_tok_s", "-"))
        rows.append((version, m["precision"], m["execution_provider"], score, speed,
                     m["created_at"], ",".join(serving.get(version, []))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _cmd_show(reg: Registry, args: argparse.Namespace) -> int:
    print(_dump(reg.manifest(args.version)).decode(), end="")
    return 0


def _cmd_current(reg: Registry, args: argparse.Namespace) -> int:
    pointer = reg.pointer(args.deployment)
    if pointer is None:
        print(f"deployment {args.deployment!r} has no current version", file=sys.stderr)
        return 1
    print(_dump(pointer).decode(), end="")
    return 0


def _rollout(reg: Registry, deployment: str, *command: str) -> int:
    """The announced rollout (imported here: the generation service imports this module)."""
    from services.generation import updates

    return updates.main(["--deployment", deployment, "--registry", str(reg.root), *command])


def _cmd_promote(reg: Registry, args: argparse.Namespace) -> int:
    if reg.current(args.deployment) is None:
        # Nothing serves this deployment from the registry yet, so nobody is to be told (and the
        # rollout needs a version to start from): the first pointer is simply set.
        pointer = reg.set_current(args.deployment, args.version, reason="first version")
        print(f"{args.deployment} -> {pointer['version']}")
        return 0
    return _rollout(reg, args.deployment, "promote", args.version, "--canary", str(args.canary))


def _cmd_rollback(reg: Registry, args: argparse.Namespace) -> int:
    return _rollout(reg, args.deployment, "rollback")


def _cmd_verify(reg: Registry, args: argparse.Namespace) -> int:
    start = time.perf_counter()
    loaded = reg.load(args.version, verify=True)
    took = time.perf_counter() - start
    size = sum(f["size"] for f in loaded.manifest["files"].values())
    print(f"{args.version}: OK, {len(loaded.manifest['files'])} files, "
          f"{size / 1e6:.1f} MB verified in {took:.2f} s")
    return 0


def _cmd_prune(reg: Registry, args: argparse.Namespace) -> int:
    doomed = reg.prune(keep=args.keep, min_age_s=args.min_age_hours * 3600, dry_run=args.dry_run)
    for version in doomed:
        print(f"{'would remove' if args.dry_run else 'removed'} {version}")
    if not doomed:
        print("nothing to prune")
    return 0


def _cmd_gc(reg: Registry, args: argparse.Namespace) -> int:
    for path in reg.gc(args.older_than):
        print(f"removed {path}")
    return 0


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _hours(text: str) -> float:
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if not hours >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours >= 0")
    return hours


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m model.registry``; registry errors exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m model.registry",
                                     description="Inspect and move Colloquy model versions.")
    parser.add_argument("--root", type=Path, default=None,
                        help="registry root (default $COLLOQUY_MODEL_REGISTRY or <cache>/registry)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="versions, with quality and which deployment serves them")
    p = sub.add_parser("show", help="print a version's manifest")
    p.add_argument("version")
    p = sub.add_parser("current", help="print a deployment's pointer")
    p.add_argument("deployment")
    p = sub.add_parser("promote", help="serve VERSION (to --canary percent of conversations first): "
                                       "recorded and announced on model.updates, as `make promote`")
    p.add_argument("deployment")
    p.add_argument("version")
    p.add_argument("--canary", type=int, default=100, metavar="PERCENT", help="1..99 for a canary; 100: all")
    p = sub.add_parser("rollback", help="back to the version served before, announced as `make rollback`")
    p.add_argument("deployment")
    p = sub.add_parser("verify", help="check every file of a version against its manifest")
    p.add_argument("version")
    p = sub.add_parser("prune", help="remove derived versions (RLHF children) that nothing serves or can roll "
                                     "back to, but the --keep newest and those younger than --min-age-hours")
    p.add_argument("--keep", type=_count, default=2, help="unserved children to keep, newest first (default 2)")
    p.add_argument("--min-age-hours", type=_hours, default=24.0,
                   help="never remove one published less than this long ago (default 24)")
    p.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
    p = sub.add_parser("gc", help="remove leftovers of crashed publishes")
    p.add_argument("--older-than", type=float, default=3600.0)
    args = parser.parse_args(argv)
    reg = Registry(args.root)
    handler = {"list": _cmd_list, "show": _cmd_show, "current": _cmd_current,
               "promote": _cmd_promote, "rollback": _cmd_rollback, "verify": _cmd_verify,
               "prune": _cmd_prune, "gc": _cmd_gc}[args.command]
    try:
        return handler(reg, args)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
