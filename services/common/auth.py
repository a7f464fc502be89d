"""API keys: stored as SHA-256 hashes, looked up in constant time, reloaded when the file changes.

Shared by the gateway (every ChatService call) and the web front (routes that do not reach the
gateway: /v1/models, /v1/moderations); each process reports reloads through its own hook.

A reload is all or nothing: a file that does not parse or does not match the schema (a
half-written rewrite, a typo) is rejected whole, the last good keys stay in use, and one error
line and a metric say so. Only a valid file changes the keys, so removing an entry (or writing
`keys: []`) revokes, while a truncated or empty file does not silently revoke everything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import yaml

log = logging.getLogger(__name__)


class KeyFileError(ValueError):
    """The key file is not a valid key list (the message says where)."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a key belongs to; `labeler` keys may label their feedback as simulated."""

    user: str
    labeler: bool = False


def parse_keys(doc: Any) -> list[tuple[bytes, Identity]]:
    """The (hash, identity) entries of a parsed key file; KeyFileError on any schema error.

    `keys` must be present (an empty file is a failed write, not a revocation).
    """
    if not isinstance(doc, dict) or "keys" not in doc:
        raise KeyFileError("the file must be a mapping with a 'keys' list (use 'keys: []' to revoke every key)")
    items = doc["keys"]
    if not isinstance(items, list):
        raise KeyFileError("'keys' must be a list")
    entries: list[tuple[bytes, Identity]] = []
    seen: set[bytes] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise KeyFileError(f"keys[{i}] must be a mapping with 'sha256' and 'user'")
        digest, user, labeler = item.get("sha256"), item.get("user"), item.get("labeler", False)
        if not isinstance(user, str) or not user.strip():
            raise KeyFileError(f"keys[{i}].user must be a non-empty string")
        if not isinstance(digest, str) or len(digest) != 64:
            raise KeyFileError(f"keys[{i}].sha256 must be 64 hex characters")
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raise KeyFileError(f"keys[{i}].sha256 must be 64 hex characters") from None
        if not isinstance(labeler, bool):
            raise KeyFileError(f"keys[{i}].labeler must be true or false")
        if raw in seen:
            raise KeyFileError(f"keys[{i}].sha256 appears twice")
        seen.add(raw)
        entries.append((raw, Identity(user, labeler)))
    return entries


class KeyRing:
    """Maps a presented API key to an identity. Reloads its file when it changes (mtime, size, inode).

    `reloaded(ok)` is called after each version of the file is read: True when it is in use, False
    when it was rejected (a process's metrics hook)."""

    def __init__(self, path: str, reloaded: Callable[[bool], None] = lambda ok: None) -> None:
        self.path = path
        self.reloaded = reloaded
        self._version: tuple[int, int, int] | None = None  # of the file last read, good or bad (None: gone)
        self._entries: list[tuple[bytes, Identity]] = []
        self._lock = threading.Lock()
        version = self._stat()
        self._entries = self._read()  # a bad file at startup stops the gateway with the reason
        self._version = version
        self.reloaded(True)

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> list[tuple[bytes, Identity]]:
        try:
            with open(self.path) as fh:
                doc = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise KeyFileError(f"{self.path}: not valid YAML ({exc.__class__.__name__})") from None
        except UnicodeDecodeError:
            raise KeyFileError(f"{self.path}: not UTF-8 text") from None
        try:
            return parse_keys(doc)
        except KeyFileError as exc:
            raise KeyFileError(f"{self.path}: {exc}") from None

    def _reload(self) -> None:
        """Apply a changed file, or keep the last good keys and report the bad version once."""
        try:
            version: tuple[int, int, int] | None = self._stat()
        except OSError:
            version = None  # gone (an unmounted Secret, a deleted file): as bad as a broken one
        if version == self._version:
            return
        with self._lock:
            if version == self._version:
                return
            self._version = version  # good or bad, this version is handled once
            try:
                if version is None:
                    raise KeyFileError(f"{self.path}: the file is missing")
                entries = self._read()
            except (KeyFileError, OSError) as exc:
                self.reloaded(False)
                log.error("API key file rejected; still serving the last good keys",
                          extra={"error": str(exc)})
                return
            self._entries = entries
            self.reloaded(True)
            log.info("API key file reloaded", extra={"keys": len(entries)})

    def identity(self, key: str) -> Identity | None:
        """Who holds `key`, or None. Compares every stored hash (no early exit)."""
        self._reload()
        digest = hashlib.sha256(key.encode()).digest()
        found: Identity | None = None
        with self._lock:
            entries = self._entries
        for stored, who in entries:
            if hmac.compare_digest(stored, digest):
                found = who
        return found

    def user_for(self, key: str) -> str | None:
        """The user id for `key`, or None."""
        who = self.identity(key)
        return who.user if who is not None else None


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
        print("usage: python -m services.common.auth hash <key>", file=sys.stderr)
        raise SystemExit(2)
