"""Registry unit tests: atomic publish, checksum refusal, half-written versions, pointers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from model import registry as regmod
from model.registry import (
    CorruptVersion,
    InvalidName,
    PointerError,
    Registry,
    RegistryError,
    VersionExists,
    VersionNotFound,
)


def make_model(path: Path, payload: bytes = b"weights") -> Path:
    """A fake model directory with a nested file, enough to exercise every code path."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(b"onnx-graph")
    (path / "model.onnx.data").write_bytes(payload * 1000)
    (path / "genai_config.json").write_text('{"model": {}}')
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "extra.txt").write_text("nested")
    return path


def publish(reg: Registry, src: Path, version: str, **kw: object):
    defaults = {"source": "test", "precision": "fp32", "execution_provider": "cpu"}
    defaults.update(kw)
    return reg.publish(src, version, **defaults)  # type: ignore[arg-type]


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_model(tmp_path / "src")


def test_publish_records_every_file_and_loads(reg: Registry, src: Path) -> None:
    mv = publish(reg, src, "v1", quality={"score": 3, "total": 4, "per_question": []})
    assert mv.path == reg.root / "versions" / "v1"
    assert set(mv.manifest["files"]) == {"model.onnx", "model.onnx.data", "genai_config.json",
                                         "sub/extra.txt"}
    info = mv.manifest["files"]["model.onnx.data"]
    assert info["size"] == 7000 and len(info["sha256"]) == 64
    loaded = reg.load("v1")
    assert loaded.manifest == mv.manifest
    assert loaded.manifest["quality"]["score"] == 3
    assert loaded.manifest["created_at"].endswith("Z")
    assert reg.list_versions() == ["v1"]
    # no staging leftovers after a successful publish
    assert [p.name for p in reg.root.iterdir() if p.name.startswith(".")] == []


def test_publish_env_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, src: Path) -> None:
    monkeypatch.setenv("COLLOQUY_MODEL_REGISTRY", str(tmp_path / "envreg"))
    publish(Registry(), src, "v1")
    assert (tmp_path / "envreg" / "versions" / "v1" / "manifest.json").is_file()


def test_training_and_parent_recorded(reg: Registry, src: Path) -> None:
    publish(reg, src, "base")
    training = {"data_window": {"from": "2024-01-01T00:00:00Z", "to": "2024-01-08T00:00:00Z"},
                "metrics": {"reward_mean": 0.4, "kl": 0.02}}
    mv = publish(reg, src, "rlhf-1", parent_version="base", training=training)
    assert mv.manifest["parent_version"] == "base"
    assert reg.manifest("rlhf-1")["training"] == training
    with pytest.raises(VersionNotFound):
        publish(reg, src, "rlhf-2", parent_version="nope")


def test_versions_are_immutable(reg: Registry, src: Path) -> None:
    publish(reg, src, "v1")
    with pytest.raises(VersionExists):
        publish(reg, src, "v1")


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 200, "sp ace"])
def test_invalid_names_refused(reg: Registry, src: Path, name: str) -> None:
    with pytest.raises(InvalidName):
        publish(reg, src, name)
    with pytest.raises(InvalidName):
        reg.set_current(name, "v1")


def test_checksum_corruption_refused(reg: Registry, src: Path) -> None:
    mv = publish(reg, src, "v1")
    data = mv.path / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[123] ^= 0xFF  # same size, one flipped byte
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptVersion, match=r"checksum mismatch in model\.onnx\.data"):
        reg.load("v1")
    # verification can be skipped for huge files: then only sizes are checked
    assert reg.load("v1", verify=False).version == "v1"


def test_truncated_missing_and_extra_files_refused(reg: Registry, src: Path) -> None:
    mv = publish(reg, src, "v1")
    data = mv.path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-1])
    with pytest.raises(CorruptVersion, match="size"):
        reg.load("v1", verify=False)
    mv2 = publish(reg, src, "v2")
    (mv2.path / "sub" / "extra.txt").unlink()
    with pytest.raises(CorruptVersion, match=r"missing sub/extra\.txt"):
        reg.load("v2")
    mv3 = publish(reg, src, "v3")
    (mv3.path / "smuggled.bin").write_bytes(b"x")
    with pytest.raises(CorruptVersion, match="not in its manifest"):
        reg.load("v3")


def test_bad_manifest_refused(reg: Registry, src: Path) -> None:
    mv = publish(reg, src, "v1")
    manifest = json.loads((mv.path / "manifest.json").read_text())
    del manifest["files"]
    (mv.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptVersion, match="lacks"):
        reg.load("v1")
    (mv.path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptVersion, match="unreadable"):
        reg.load("v1")
    with pytest.raises(VersionNotFound):
        reg.load("never-published")


def test_half_written_versions_ignored_and_refused(reg: Registry, src: Path) -> None:
    publish(reg, src, "good")
    # a crashed publish leaves a staging dir; a hand copy may leave a dir without manifest
    staging = reg.root / ".staging-v2-deadbeef"
    make_model(staging)
    half = reg.root / "versions" / "half"
    make_model(half)
    assert reg.list_versions() == ["good"]
    assert not reg.exists("half")
    with pytest.raises(CorruptVersion, match="no manifest"):
        reg.load("half")
    with pytest.raises(CorruptVersion):
        reg.set_current("generation", "half")
    assert reg.current("generation") is None
    # gc sweeps old staging dirs only
    assert reg.gc(older_than_s=3600) == []
    old = time.time() - 7200
    os.utime(staging, (old, old))
    assert reg.gc(older_than_s=3600) == [staging]
    assert not staging.exists()


def test_crash_mid_copy_leaves_nothing_visible(reg: Registry, src: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real_copy = regmod._copy_hashing
    calls = {"n": 0}

    def failing_copy(a: Path, b: Path) -> dict[str, object]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_copy(a, b)

    monkeypatch.setattr(regmod, "_copy_hashing", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        publish(reg, src, "v1")
    assert reg.list_versions() == []
    assert not (reg.root / "versions" / "v1").exists()
    assert [p for p in reg.root.iterdir() if p.name.startswith(".staging-")] == []


def test_crash_before_rename_leaves_nothing_visible(reg: Registry, src: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_rename(a: object, b: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(regmod.os, "rename", failing_rename)
    with pytest.raises(OSError, match="power cut"):
        publish(reg, src, "v1")
    monkeypatch.undo()
    assert reg.list_versions() == []
    assert publish(reg, src, "v1").version == "v1"  # the name is still free


def test_promote_and_rollback(reg: Registry, src: Path) -> None:
    for v in ("v1", "v2", "v3"):
        publish(reg, src, v)
    assert reg.current("generation") is None
    with pytest.raises(PointerError):
        reg.rollback("generation")
    reg.set_current("generation", "v1")
    reg.set_current("generation", "v2", reason="better")
    pointer = reg.set_current("generation", "v3")
    assert pointer["version"] == "v3" and pointer["history"] == ["v1", "v2"]
    assert reg.rollback("generation")["version"] == "v2"
    assert reg.rollback("generation")["version"] == "v1"
    with pytest.raises(PointerError, match="nothing to roll back"):
        reg.rollback("generation")
    pointer = reg.pointer("generation")
    assert pointer is not None
    assert [e["action"] for e in pointer["events"]] == ["promote"] * 3 + ["rollback"] * 2
    assert pointer["events"][1]["reason"] == "better"
    # promoting the current version again does not grow the history
    assert reg.set_current("generation", "v1")["history"] == []
    # pointer writes are atomic: no temp files left behind
    assert sorted(p.name for p in reg.current_dir.iterdir()) == [".lock", "generation.json"]


def test_rollback_falls_back_to_parent(reg: Registry, src: Path) -> None:
    publish(reg, src, "base")
    publish(reg, src, "rlhf-1", parent_version="base")
    reg.set_current("generation", "rlhf-1")
    pointer = reg.rollback("generation")
    assert pointer["version"] == "base" and pointer["history"] == []


def test_promote_refuses_corrupt_version(reg: Registry, src: Path) -> None:
    publish(reg, src, "v1")
    mv = publish(reg, src, "v2")
    reg.set_current("generation", "v1")
    (mv.path / "model.onnx").write_bytes(b"ONNX-GRAPH")  # same size, different bytes
    with pytest.raises(CorruptVersion):
        reg.set_current("generation", "v2")
    assert reg.current("generation") == "v1"


def test_rollback_refuses_corrupt_target(reg: Registry, src: Path) -> None:
    mv1 = publish(reg, src, "v1")
    publish(reg, src, "v2")
    reg.set_current("generation", "v1")
    reg.set_current("generation", "v2")
    (mv1.path / "model.onnx").unlink()
    with pytest.raises(CorruptVersion):
        reg.rollback("generation")
    assert reg.current("generation") == "v2"


def test_annotate_updates_metadata_not_identity(reg: Registry, src: Path) -> None:
    publish(reg, src, "v1", quality={"score": 1, "total": 2})
    manifest = reg.annotate("v1", {"quality": {"score": 2, "total": 3}})
    assert manifest["quality"] == {"score": 2, "total": 3} and "updated_at" in manifest
    assert reg.load("v1").manifest["quality"]["total"] == 3
    with pytest.raises(RegistryError, match="cannot change"):
        reg.annotate("v1", {"files": {}})


def test_set_current_if_unset(reg: Registry, src: Path) -> None:
    publish(reg, src, "v1")
    publish(reg, src, "v2")
    assert reg.set_current_if_unset("generation", "v1") is True
    assert reg.set_current_if_unset("generation", "v2") is False
    assert reg.current("generation") == "v1"


def test_unreadable_pointer(reg: Registry) -> None:
    reg.current_dir.mkdir(parents=True)
    (reg.current_dir / "generation.json").write_text("{oops")
    with pytest.raises(PointerError):
        reg.current("generation")


def test_cli(reg: Registry, src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(reg.root)
    publish(reg, src, "v1", quality={"score": 11, "total": 12, "decode_tok_s": 100.0})
    publish(reg, src, "v2", parent_version="v1")
    assert regmod.main(["--root", root, "promote", "generation", "v1"]) == 0  # the first version: no rollout
    assert capsys.readouterr().out.strip() == "generation -> v1"
    reg.set_current("generation", "v2")  # a promote through the CLI announces it: the next test
    assert regmod.main(["--root", root, "list"]) == 0
    out = capsys.readouterr().out
    assert "11/12" in out and "generation" in out
    assert regmod.main(["--root", root, "show", "v2"]) == 0
    assert json.loads(capsys.readouterr().out)["parent_version"] == "v1"
    assert regmod.main(["--root", root, "current", "generation"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v2"
    assert regmod.main(["--root", root, "verify", "v1"]) == 0
    assert "OK" in capsys.readouterr().out
    (reg.version_path("v2") / "model.onnx").write_bytes(b"ONNX-GRAPH")
    assert regmod.main(["--root", root, "verify", "v2"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert regmod.main(["--root", root, "current", "other"]) == 1


def test_a_version_that_failed_its_quality_gate_is_never_served(reg: Registry, src: Path) -> None:
    from model.registry import FailedQualityGate

    publish(reg, src, "good")
    gate = {"passed": False, "score_pct": 60.0, "reference": "child fp32", "reference_pct": 70.0,
            "points": 2.0}
    publish(reg, src, "lossy", quality={"score": 90, "total": 150, "gate": gate})
    reg.set_current("generation", "good")
    with pytest.raises(FailedQualityGate, match=r"lossy.*quality gate"):
        reg.set_current("generation", "lossy")
    with pytest.raises(FailedQualityGate):
        reg.set_canary("generation", "lossy", 10)
    assert reg.current("generation") == "good" and reg.canary("generation") is None
    forgetful = {**gate, "score_pct": 70.0, "passed_vs_reference": True, "parent_pct": 79.0,
                 "passed_vs_parent": False}  # kept its float32's score, lost knowledge to its parent
    publish(reg, src, "forgetful", quality={"score": 105, "total": 150, "gate": forgetful})
    with pytest.raises(FailedQualityGate, match=r"70.0% against its parent 79.0%"):
        reg.set_current("generation", "forgetful")
    publish(reg, src, "fine", quality={"score": 100, "total": 150, "gate": {**gate, "passed": True}})
    reg.set_current("generation", "fine")
    assert reg.current("generation") == "fine"


@pytest.mark.kafka
def test_registry_cli_promote_and_rollback_are_announced_to_running_replicas_like_make_promote(
        reg: Registry, src: Path, kafka_bootstrap: str, unique: str) -> None:
    """Before: `python -m model.registry promote` moved the pointer and told no one, so running
    replicas kept serving the old version until restarted; `make promote` announced it."""
    from colloquy.v1 import events_pb2

    from services.common import events, topics
    from services.generation import updates
    from tests.common.kafka_util import Tail

    root, dep = str(reg.root), f"test-{unique}"  # a deployment no running service serves
    for version in ("v1", "v2", "v3"):
        publish(reg, src, version)
    assert regmod.main(["--root", root, "promote", dep, "v1"]) == 0  # the first pointer: nobody serves it yet
    topics.ensure_topics(kafka_bootstrap, [topics.MODEL_UPDATES])
    tail = Tail(kafka_bootstrap, topics.MODEL_UPDATES.name)

    def announced(expect: int) -> list[events_pb2.ModelUpdate]:
        deadline = time.monotonic() + 30
        mine: list[events_pb2.ModelUpdate] = []
        while len(mine) < expect and time.monotonic() < deadline:
            mine = [events.decode(r.value, r.headers, events_pb2.ModelUpdate) for r in tail.read(settle=0.2)
                    if r.key == dep.encode()]
        return mine

    try:
        assert regmod.main(["--root", root, "promote", dep, "v2"]) == 0
        assert reg.current(dep) == "v2"
        assert [(u.action, u.version) for u in announced(1)] == [("promote", "v2")]
        assert regmod.main(["--root", root, "promote", dep, "v3", "--canary", "10"]) == 0
        assert reg.canary(dep) == {**reg.canary(dep), "version": "v3", "percent": 10}
        assert regmod.main(["--root", root, "rollback", dep]) == 0  # drops the canary
        assert reg.canary(dep) is None and reg.current(dep) == "v2"
        # `make promote`'s path, for comparison: the same event for the same move.
        assert updates.main(["--deployment", dep, "--registry", root, "promote", "v3"]) == 0
        mine = announced(4)
    finally:
        tail.close()
    assert [(u.action, u.version, u.canary_percent, u.parent_version) for u in mine] == [
        ("promote", "v2", 100, "v1"), ("promote", "v3", 10, "v2"), ("rollback", "v2", 0, "v2"),
        ("promote", "v3", 100, "v2")]
    assert reg.current(dep) == "v3"


def test_prune_removes_only_unserved_children_past_keep_and_age(reg: Registry, src: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """RLHF rounds publish a child of hundreds of MB each; prune keeps what is served, can be
    rolled back to (and their ancestors), the canary, the newest `keep`, and every base build."""
    publish(reg, src, "base")
    publish(reg, src, "other-base")
    for v in ("c1", "c2", "c3", "c4", "c5", "c6"):
        publish(reg, src, v, parent_version="base")
    publish(reg, src, "c7", parent_version="c6")
    reg.set_current("generation", "c2")
    reg.set_current("generation", "c7")  # c2 in history; c7's parent c6 kept as its ancestor
    reg.set_canary("generation", "c3", 10)
    # every version was published a moment ago: the age guard keeps them all
    assert reg.prune(keep=0) == []
    assert reg.prune(keep=0, min_age_s=0, dry_run=True) == ["c1", "c4", "c5"]
    assert reg.prune(keep=1, min_age_s=0) == ["c1", "c4"]
    assert set(reg.list_versions()) == {"base", "other-base", "c2", "c3", "c5", "c6", "c7"}
    assert not [p for p in reg.root.iterdir() if p.name.startswith(".staging")]
    # a version pruned between a promote's check and its pointer move is refused under the lock
    with pytest.raises(VersionNotFound), reg._locked():
        reg._move("generation", "c1", [], "promote", None)
    assert reg.current("generation") == "c7"
    publish(reg, src, "c8", parent_version="c5")  # c5 is now the parent of the newest child
    assert reg.prune(keep=1, min_age_s=0) == []
    assert regmod.main(["--root", str(reg.root), "prune", "--keep", "0", "--min-age-hours", "0"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["removed c5", "removed c8"]
    assert regmod.main(["--root", str(reg.root), "prune", "--keep", "0", "--min-age-hours", "0"]) == 0
    assert capsys.readouterr().out.strip() == "nothing to prune"
    with pytest.raises(SystemExit):
        regmod.main(["--root", str(reg.root), "prune", "--keep", "-1"])
    assert "whole number" in capsys.readouterr().err
