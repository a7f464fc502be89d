"""Automatic prefix caching (as vLLM's): prompt KV kept by blocks of tokens, keyed by a hash chain.

Block i's key hashes block i-1's key and block i's token ids, so a key names the whole prefix up
to the end of its block: the hidden instructions every prompt starts with are one chain shared by
all conversations, and a conversation's next turn finds its earlier turns' blocks. One cache per
loaded model version (the root of the chain is the version, and a retired model's cache is
cleared), bounded by bytes, least recently used blocks evicted first; a lookup touches a chain's
blocks from the last to the first, so a prefix outlives the blocks that extend it.

Only positions that were *prefilled* are cached (never decoded ones), and a hit always leaves at
least two prompt tokens to prefill: on CPU a one-row pass (decode, or a one-token chunk) computes
in a different kernel path than a multi-row one and differs in the last bits, so this is what
keeps a hit's answer token-identical to a miss's.

An answer's positions get here the same way: when a request (n == 1) finishes, the scheduler
queues a *cache fill* (scheduler.Fill) that prefills prompt + answer (+ its end token)
in multi-row chunks, starting after the blocks already cached (`cached`), and inserts its full
blocks. That is the prefill the conversation's next turn would have done for those tokens,
moved off its critical path (it runs only while no request waits or prefills); the next turn
hits them as far as its prompt re-tokenizes the answer to the same ids.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable, Sequence

import numpy as np

from services.generation import metrics as M


class PrefixCache:
    """Block KV (host arrays [layers, 2, kv_heads, block, head_dim]) under an LRU byte budget."""

    def __init__(self, namespace: str, block: int, budget_bytes: int, bytes_per_token: int,
                 min_tokens: int = 1) -> None:
        self.namespace = namespace.encode()
        self.block = block
        self.block_bytes = block * bytes_per_token
        self.capacity = budget_bytes // self.block_bytes if self.block_bytes else 0  # blocks
        self.min_tokens = min_tokens
        self._blocks: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()  # close() comes from the event loop's thread (model swap)

    @property
    def tokens(self) -> int:
        return len(self._blocks) * self.block

    @property
    def nbytes(self) -> int:
        return len(self._blocks) * self.block_bytes

    def _keys(self, ids: Sequence[int], blocks: int) -> list[bytes]:
        keys, prev = [], self.namespace
        arr = np.asarray(ids[:blocks * self.block], dtype=np.int64)
        for i in range(blocks):
            prev = hashlib.blake2b(prev + arr[i * self.block:(i + 1) * self.block].tobytes(),
                                   digest_size=16).digest()
            keys.append(prev)
        return keys

    def lookup(self, ids: Sequence[int]) -> list[np.ndarray]:
        """The cached blocks that start `ids`, leaving at least two tokens uncached (see the docstring)."""
        usable = max(0, len(ids) - 2) // self.block
        M.PREFIX_QUERIES.inc(len(ids))
        keys = self._keys(ids, usable)
        with self._lock:
            found = self._chain(keys)
        hit = len(found) * self.block
        M.PREFIX_HITS.inc(hit)
        M.PREFIX_REUSED_TOKENS.inc(hit)
        M.PREFIX_LOOKUPS.labels("hit" if hit else "miss").inc()
        return found

    def cached(self, ids: Sequence[int]) -> list[np.ndarray]:
        """Every cached full block that starts `ids`, however short: a cache fill's starting point.

        Not a request's lookup: neither counted in the query/hit metrics nor held to `min_tokens`.
        """
        keys = self._keys(ids, len(ids) // self.block)
        with self._lock:
            return self._chain(keys, 1)

    def _chain(self, keys: list[bytes], min_tokens: int | None = None) -> list[np.ndarray]:
        found: list[np.ndarray] = []
        for key in keys:
            data = self._blocks.get(key)
            if data is None:
                break
            found.append(data)
        if len(found) * self.block < (self.min_tokens if min_tokens is None else min_tokens):
            found = []
        for key in reversed(keys[:len(found)]):
            self._blocks.move_to_end(key)
        return found

    def insert(self, ids: Sequence[int], read: Callable[[int, int], np.ndarray]) -> None:
        """Keep the full blocks of prefilled `ids` not cached yet; `read(start, end)` gives their KV."""
        if not self.capacity:
            return
        keys = self._keys(ids, len(ids) // self.block)
        missing = [i for i, k in enumerate(keys) if k not in self._blocks]
        new: dict[bytes, np.ndarray] = {}
        if missing:
            first = missing[0]
            data = read(first * self.block, len(keys) * self.block)
            for i in missing:
                off = (i - first) * self.block
                new[keys[i]] = data[:, :, :, off:off + self.block].copy()
        evicted = 0
        with self._lock:
            self._blocks.update(new)
            for key in reversed(keys):
                if key in self._blocks:
                    self._blocks.move_to_end(key)
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)
                evicted += 1
        if evicted:
            M.PREFIX_EVICTIONS.labels("lru").inc(evicted)

    def close(self, reason: str) -> None:
        """Drop every block and keep no more (the model version is retired)."""
        with self._lock:
            self.capacity = 0
            dropped = len(self._blocks)
            self._blocks.clear()
        if dropped:
            M.PREFIX_EVICTIONS.labels(reason).inc(dropped)
