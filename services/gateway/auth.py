"""API keys: stored as SHA-256 hashes, looked up in constant time, reloaded when the file changes."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import sys
import threading

import yaml


class KeyRing:
    """Maps a presented API key to a user id. Reloads its file when the mtime changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime = -1.0
        self._entries: list[tuple[bytes, str]] = []
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        mtime = os.stat(self.path).st_mtime
        if mtime == self._mtime:
            return
        with open(self.path) as fh:
            doc = yaml.safe_load(fh) or {}
        entries = []
        for i, item in enumerate(doc.get("keys", [])):
            digest, user = str(item.get("sha256", "")), str(item.get("user", ""))
            if len(digest) != 64 or not user:
                raise ValueError(f"{self.path}: keys[{i}] needs a 64-hex 'sha256' and a 'user'")
            entries.append((bytes.fromhex(digest), user))
        with self._lock:
            self._entries, self._mtime = entries, mtime

    def user_for(self, key: str) -> str | None:
        """The user id for `key`, or None. Compares every stored hash (no early exit)."""
        with contextlib.suppress(OSError, ValueError):  # keep the last good keys mid-rewrite
            self._load()
        digest = hashlib.sha256(key.encode()).digest()
        found: str | None = None
        with self._lock:
            for stored, user in self._entries:
                if hmac.compare_digest(stored, digest):
                    found = user
        return found


def key_from_metadata(metadata: tuple | list | None) -> str:
    """The key in `authorization: Bearer <key>` (a bare key is accepted too)."""
    for k, v in metadata or ():
        if k == "authorization":
            v = v if isinstance(v, str) else v.decode()
            return v[7:].strip() if v.lower().startswith("bearer ") else v.strip()
    return ""


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "hash":
        print(hashlib.sha256(sys.argv[2].encode()).hexdigest())
    else:
        print("usage: python -m services.gateway.auth hash <key>", file=sys.stderr)
        raise SystemExit(2)
