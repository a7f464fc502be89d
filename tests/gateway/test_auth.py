"""API key file reloads (services.common.auth, with the gateway's metrics hook): atomic (a bad file
never replaces good keys), loud once, and revocations hold.

Real files in tmp_path; each rewrite bumps the mtime so the ring sees a new version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.common.auth import KeyRing
from services.gateway import metrics

GOOD = ("keys:\n  - user: ann\n    sha256: {k1}\n  - user: bob\n    sha256: {k2}\n"
        .format(k1=hashlib.sha256(b"k1").hexdigest(), k2=hashlib.sha256(b"k2").hexdigest()))


def rewrite(f: Path, text: str) -> None:
    """Write a new version of the file with a distinct mtime (as a later edit would have)."""
    f.write_text(text)
    later = time.time() + rewrite.bump  # type: ignore[attr-defined]
    rewrite.bump += 1  # type: ignore[attr-defined]
    os.utime(f, (later, later))


rewrite.bump = 5  # type: ignore[attr-defined]


def errors_total() -> float:
    return REGISTRY.get_sample_value("colloquy_gateway_api_key_reload_errors_total") or 0.0


def last_reload_ok() -> float | None:
    return REGISTRY.get_sample_value("colloquy_gateway_api_keys_last_reload_ok")


@pytest.fixture
def ring(tmp_path: Path) -> tuple[KeyRing, Path]:
    f = tmp_path / "keys.yaml"
    f.write_text(GOOD)
    return KeyRing(str(f), metrics.api_keys_reloaded), f


BAD_FILES = {
    "truncated_yaml": GOOD[: GOOD.index("sha256") + 12] + "\n  - user: [",
    "zero_bytes": "",
    "keys_not_a_list": "keys: 5\n",
    "entry_not_a_mapping": "keys:\n  - just-a-string\n",
    "top_level_list": "- user: ann\n",
    "missing_sha256": "keys:\n  - user: ann\n",
    "sha256_not_hex": "keys:\n  - user: ann\n    sha256: " + "z" * 64 + "\n",
    "user_not_a_string": f"keys:\n  - user: [1]\n    sha256: {hashlib.sha256(b'k1').hexdigest()}\n",
    "labeler_not_a_bool": f"keys:\n  - user: ann\n    sha256: {hashlib.sha256(b'k1').hexdigest()}\n"
                          "    labeler: maybe\n",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_key_file_keeps_serving_last_good_keys(ring: tuple[KeyRing, Path], name: str) -> None:
    keys, f = ring
    rewrite(f, BAD_FILES[name])
    assert keys.user_for("k1") == "ann"  # neither an exception nor a revocation
    assert keys.user_for("k2") == "bob"
    assert keys.user_for("k3") is None
    assert last_reload_ok() == 0.0


def test_bad_key_file_logs_one_error_per_file_version_and_counts_it(
        ring: tuple[KeyRing, Path], caplog: pytest.LogCaptureFixture) -> None:
    keys, f = ring
    before = errors_total()
    caplog.set_level(logging.ERROR, logger="services.common.auth")
    rewrite(f, "keys: 5\n")
    for _ in range(20):
        keys.user_for("k1")
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert errors_total() == before + 1
    rewrite(f, "keys:\n  - user: ann\n")  # another bad version: one more line
    for _ in range(20):
        keys.user_for("k1")
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 2
    assert errors_total() == before + 2
    rewrite(f, GOOD.replace("bob", "bea"))  # fixed: applied, gauge back to 1
    assert keys.user_for("k2") == "bea"
    assert last_reload_ok() == 1.0


def test_removed_key_is_revoked(ring: tuple[KeyRing, Path]) -> None:
    keys, f = ring
    rewrite(f, GOOD.split("  - user: bob")[0])
    assert keys.user_for("k1") == "ann"
    assert keys.user_for("k2") is None


def test_explicit_empty_key_list_revokes_every_key(ring: tuple[KeyRing, Path]) -> None:
    keys, f = ring
    rewrite(f, "keys: []\n")
    assert keys.user_for("k1") is None
    assert keys.user_for("k2") is None
    assert last_reload_ok() == 1.0


def test_bad_key_file_at_startup_stops_the_gateway_with_the_reason(tmp_path: Path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text("keys: 5\n")
    with pytest.raises(ValueError, match="keys"):
        KeyRing(str(f))


def test_labeler_flag_is_read_per_key(tmp_path: Path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text(GOOD + "    labeler: true\n")
    keys = KeyRing(str(f))
    ann, bob = keys.identity("k1"), keys.identity("k2")
    assert ann is not None and bob is not None
    assert (ann.user, ann.labeler) == ("ann", False)
    assert (bob.user, bob.labeler) == ("bob", True)
    assert keys.identity("nope") is None


def test_a_deleted_key_file_keeps_the_last_good_keys_and_is_reported_once(
        ring: tuple[KeyRing, Path], caplog: pytest.LogCaptureFixture) -> None:
    keys, f = ring
    caplog.set_level(logging.ERROR, logger="services.common.auth")
    f.unlink()
    for _ in range(5):
        assert keys.user_for("k1") == "ann"
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert last_reload_ok() == 0.0
    rewrite(f, GOOD.split("  - user: bob")[0])  # back, without bob: applied
    assert keys.user_for("k2") is None
    assert last_reload_ok() == 1.0
