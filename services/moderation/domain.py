"""Moderation as plain functions over texts: normalize -> embed (windows) -> calibrated heads ->
rules -> context -> policy. No I/O here besides the models handed in.

Context (output moderation): an answer can look harmless on its own ("Sure, here are the steps")
while fulfilling a harmful request. For every category the policy marks `from_context`, the
answer's score is raised to  score(user message) x compliance(answer opening), where compliance
is a learned probability that the answer goes along with the request rather than declining or
redirecting. A refusal or a crisis-line answer to the same message stays unflagged.
"""

from __future__ import annotations

import collections
import hashlib
import math
import threading
from collections.abc import Sequence

import numpy as np
from colloquy.v1 import common_pb2

from services.moderation import rules
from services.moderation.categories import CATEGORIES, consistent
from services.moderation.classifier import Heads
from services.moderation.embedder import Embedder, TextTooLong
from services.moderation.policy import Policy
from services.moderation.profanity import Profanity

Scores = dict[str, float]


class Moderator:
    """Thread-safe (the Kafka stages and the gRPC servicer share one)."""

    def __init__(self, embedder: Embedder, heads: Heads, policy: Policy,
                 profanity: Profanity | None = None) -> None:
        self.embedder = embedder
        self.heads = heads
        self.policy = policy
        self.profanity = profanity or Profanity()

    @property
    def model_id(self) -> str:
        return f"colloquy-moderation/{self.embedder.model_id}+heads@{self.heads.version}"

    # -- scoring ---------------------------------------------------------------------------------
    def _raw(self, texts: Sequence[str]) -> tuple[list[Scores], np.ndarray]:
        """Per-text scores (max over windows) and the features of each text's first window."""
        norm = [rules.normalize(t) for t in texts]
        windows = self.embedder.windows(norm)
        emb = self.embedder.embed_windows(windows)
        prof = self.profanity.predict([norm[w.text_index][w.start:w.end] for w in windows])
        x = self.heads.features(emb, prof)
        asks = [rules.making_request(t) for t in norm]  # once per text, not per window
        probs = self.heads.scores(x, np.array([asks[w.text_index] for w in windows], dtype=bool))
        best = np.zeros((len(texts), len(CATEGORIES)), dtype=np.float32)
        first = np.zeros((len(texts), x.shape[1]), dtype=np.float32)
        seen = [False] * len(texts)
        for k, w in enumerate(windows):
            best[w.text_index] = np.maximum(best[w.text_index], probs[k])
            if not seen[w.text_index]:
                first[w.text_index] = x[k]
                seen[w.text_index] = True
        sexual_t = self.policy.categories["sexual"].threshold
        out = []
        for i, text in enumerate(norm):
            s = {c: float(best[i, j]) for j, c in enumerate(CATEGORIES)}
            out.append(consistent(rules.minors(text, s, sexual_t)))
        return out, first

    def scores(self, texts: Sequence[str]) -> list[Scores]:
        """Context-free scores for each text."""
        return self._raw(texts)[0] if texts else []

    @staticmethod
    def as_requests(texts: Sequence[str], scores: list[Scores]) -> list[Scores]:
        """`scores` of texts that are requests (a user's message), with the rules that read only
        requests (`rules.drug_request`: an answer that refuses names the drug too; `rules.disclosure`:
        an answer that helps says "if you are thinking about suicide")."""
        out = []
        for t, s in zip(texts, scores, strict=True):
            norm = rules.normalize(t)
            out.append(consistent(rules.disclosure(norm, rules.drug_request(norm, s))))
        return out

    def request_scores(self, texts: Sequence[str]) -> list[Scores]:
        """Scores of user messages: input moderation's texts, output moderation's contexts."""
        return self.as_requests(texts, self.scores(texts))

    def compliance(self, texts: Sequence[str]) -> list[float]:
        """For each answer, the probability that it goes along with the request."""
        if not texts:
            return []
        _, first = self._raw(texts)
        return [float(x) for x in self.heads.compliance(first)]

    def with_context(self, answer: Scores, context: Scores, complies: float) -> Scores:
        out = dict(answer)
        for name, rule in self.policy.categories.items():
            if rule.from_context:
                raised = context[name] * complies
                # max() would drop a NaN here; keep it so the policy fails closed on it.
                out[name] = raised if not math.isfinite(raised) else max(out[name], raised)
        return consistent(out)

    def score_batch(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> list[Scores]:
        """Scores of each text; with contexts (one per text, "" for none) the answer rule applies.

        Without contexts the texts are user messages (input moderation) and the request rules apply
        to them; with contexts the texts are answers and the request rules apply to the contexts.
        Texts and contexts go through the encoder as one batch.
        """
        if not texts:
            return []
        contexts = list(contexts or [])
        ctx_idx = [i for i, c in enumerate(contexts) if c]
        try:
            all_scores, first = self._raw([*texts, *(contexts[i] for i in ctx_idx)])
        except TextTooLong as exc:  # name the caller's field, not our batch position
            k = exc.index
            name = f"inputs[{k}]" if k < len(texts) else f"contexts[{ctx_idx[k - len(texts)]}]"
            raise TextTooLong(k, exc.tokens, name) from None
        out = all_scores[:len(texts)]
        if not contexts:
            return self.as_requests(texts, out)
        if ctx_idx:
            requests = self.as_requests([contexts[i] for i in ctx_idx], all_scores[len(texts):])
            comply = self.heads.compliance(first[ctx_idx])
            for k, i in enumerate(ctx_idx):
                out[i] = self.with_context(out[i], requests[k], float(comply[k]))
        return out

    def moderate(self, texts: Sequence[str], contexts: Sequence[str] | None = None
                 ) -> list[common_pb2.ModerationResult]:
        return [self.policy.decide(s) for s in self.score_batch(texts, contexts)]


class ScoreCache:
    """Bounded memo of text -> scores, so a streamed answer's checked windows are not re-embedded
    when the next cumulative batch arrives (or is redelivered)."""

    def __init__(self, moderator: Moderator, capacity: int = 20_000) -> None:
        self.moderator = moderator
        self.capacity = capacity
        self._items: collections.OrderedDict[tuple[str, str], object] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(kind: str, text: str) -> tuple[str, str]:
        return kind, hashlib.sha256(text.encode()).hexdigest()

    def _get_many(self, kind: str, texts: Sequence[str], compute) -> list:  # type: ignore[no-untyped-def]
        keys = [self._key(kind, t) for t in texts]
        with self._lock:
            found = {k: self._items[k] for k in keys if k in self._items}
            for k in found:
                self._items.move_to_end(k)
        todo = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in found))
        if todo:
            for t, v in zip(todo, compute(todo), strict=True):
                found[self._key(kind, t)] = v
            with self._lock:
                for t in todo:
                    k = self._key(kind, t)
                    self._items[k] = found[k]
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        return [found[k] for k in keys]

    def scores(self, texts: Sequence[str]) -> list[Scores]:
        return self._get_many("s", texts, self.moderator.scores)

    def request_scores(self, texts: Sequence[str]) -> list[Scores]:
        return self._get_many("r", texts, self.moderator.request_scores)

    def memo(self, kind: str, texts: Sequence[str], compute) -> list:  # type: ignore[no-untyped-def]
        """Any other per-text value (e.g. an answer prefix's leak score), memoized under `kind`."""
        return self._get_many(kind, texts, compute)

    def compliance(self, texts: Sequence[str]) -> list[float]:
        return self._get_many("c", texts, self.moderator.compliance)
