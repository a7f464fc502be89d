"""Sentence embeddings from the exported all-MiniLM-L6-v2 on ONNX Runtime (CPU), no torch.

The graph returns the attention-masked mean of every layer's hidden states (embedding layer +
6 transformer layers); each is L2-normalized here. Layer 6 is the usual sentence embedding
(sentence-transformers' mean pooling + normalize); the middle layers keep more of what a text
*asks for* (syntax, intent) than the last one, which is tuned for topic similarity, so the
classifier reads several of them.

Texts longer than one window are split into windows (sentences and adjacent sentence pairs),
each embedded on its own, so a harmful sentence deep inside a long answer is not averaged away
(the caller takes the maximum score over a text's windows).

The windows of one text are bounded (`MAX_WINDOWS` encoder runs), since a hostile text of tiny
sentences ("a. a. a." x 2,700 in 8 KiB) used to be 5,459 runs. Identical windows are run once (a
text's scores are the max over its windows, so this changes no score). A text whose distinct
sentence windows still exceed the bound is packed instead: consecutive whole sentences merged
into windows of 126, then 254, then 510 tokens (the encoder's 512 positions), plus a window over
each seam between two packed windows; failing that, plain 510-token chunks. Every character is
in some window at every step; larger windows dilute one bad sentence among many others, which is
the price of the bound. A text longer than `MAX_WINDOWS` full windows raises `TextTooLong`.

Every window runs through the graph **alone**, never padded into a batch with other texts. The
int8 model quantizes activations dynamically with one scale per tensor, so in a batch a text's
embedding depended on its neighbours: measured on the 390 held-out texts shuffled into batches of
16, scores moved by up to 0.34 and 6 of 1,170 verdicts flipped, i.e. one user's message could
change the verdict on another's. Alone, a text's scores are a function of that text only. It
also drops padding (about a quarter of the positions of a typical batch). Parallelism comes from
running windows concurrently (ONNX Runtime sessions are thread-safe), each run single-threaded:
unlike intra-op threads, this wastes nothing spinning when the cores are shared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from services.moderation import paths

PRECISIONS = {"int8": "model.int8.onnx", "fp32": "model.onnx"}
MAX_WINDOWS = 64  # encoder runs per text at most
MAX_POSITIONS = 512  # all-MiniLM-L6-v2's position embeddings, [CLS] and [SEP] included


class TextTooLong(ValueError):
    """A text needs more than MAX_WINDOWS full-length windows to be checked whole."""

    def __init__(self, index: int, tokens: int, name: str = "") -> None:
        self.index, self.tokens = index, tokens
        super().__init__(f"{name or f'text {index}'}: {tokens} tokens is too long to moderate "
                         f"(at most {MAX_WINDOWS} windows of {MAX_POSITIONS - 2} tokens)")


class ModelMissing(RuntimeError):
    """The ONNX model has not been built; the message says how to build it."""


@dataclasses.dataclass(frozen=True)
class Window:
    """One token window of a text: which text, and its span in characters."""

    text_index: int
    start: int
    end: int
    ids: list[int]


class Embedder:
    """Thread-safe: ONNX Runtime sessions may be run concurrently; the tokenizer is under a lock.

    ``threads``: windows embedded at once (0: one per core); each run uses one core.
    """

    dimension = 384
    layers = 7

    def __init__(self, model_dir: Path | None = None, threads: int = 0, window_tokens: int = 64,
                 stride_tokens: int = 32, precision: str = "int8") -> None:
        folder = model_dir or paths.model_dir()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}")
        model_file = folder / PRECISIONS[precision]
        if not model_file.exists() or not (folder / "manifest.json").exists():
            raise ModelMissing(f"no moderation model {model_file}: run `python -m services.moderation.build`")
        self.precision = precision
        self.manifest = json.loads((folder / "manifest.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_file), opts,
                                            providers=["CPUExecutionProvider"])
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.no_truncation()
        self._tok.no_padding()
        self._lock = threading.Lock()
        # [CLS] and [SEP] take two of the window's positions.
        self.window_tokens = window_tokens - 2
        self.stride_tokens = min(stride_tokens, self.window_tokens)
        self.max_tokens = MAX_POSITIONS - 2
        self.max_windows = MAX_WINDOWS
        self.threads = threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="embed") if self.threads > 1 else None
        self.cls_id = self._tok.token_to_id("[CLS]")
        self.sep_id = self._tok.token_to_id("[SEP]")

    @property
    def model_id(self) -> str:
        return f"{paths.EMBEDDER_NAME}-onnx-{self.precision}@{self.manifest.get('build_id', '?')}"

    def windows(self, texts: list[str]) -> list[Window]:
        """The spans of each text to embed, at most MAX_WINDOWS per text, together covering it.

        A text that fits one window is one window (as in training). A longer text is cut into
        sentences, and each sentence and each pair of adjacent sentences is a window (sentences
        longer than a window are cut into overlapping token windows): one hateful sentence in a
        long answer is scored nearly on its own instead of being averaged with its neighbours.
        Identical windows of a text are listed once; beyond MAX_WINDOWS, see the module doc.
        """
        with self._lock:  # Tokenizer objects are not documented as thread-safe
            encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        out: list[Window] = []
        for i, enc in enumerate(encodings):
            ids, offsets = enc.ids, enc.offsets
            if len(ids) <= self.window_tokens:
                out.append(Window(i, 0, len(texts[i]), [self.cls_id, *ids, self.sep_id]))
                continue
            for a, b in self._plan(i, texts[i], offsets):
                out.append(Window(i, offsets[a][0], offsets[b - 1][1], [self.cls_id, *ids[a:b], self.sep_id]))
        return out

    def _plan(self, index: int, text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Token spans of a long text's windows: the finest plan that fits MAX_WINDOWS."""
        sentences = self._sentences(text, offsets)
        plan = self._distinct(text, offsets, self._cut(_sentence_pieces(sentences, self.window_tokens),
                                                       self.window_tokens, self.stride_tokens))
        size = self.window_tokens
        while len(plan) > self.max_windows and size < self.max_tokens:
            size = min(2 * size + 2, self.max_tokens)  # 62 -> 126 -> 254 -> 510 tokens
            plan = self._distinct(text, offsets, self._cut(_packed_pieces(sentences, size), size, size // 2))
        if len(plan) > self.max_windows:
            plan = self._distinct(text, offsets, self._cut([(0, len(offsets))], size, size))
        if len(plan) > self.max_windows:
            raise TextTooLong(index, len(offsets))
        return plan

    @staticmethod
    def _cut(pieces: list[tuple[int, int]], size: int, stride: int) -> list[tuple[int, int]]:
        """Each token span as windows of at most `size` tokens, `stride` apart."""
        out = []
        for a, b in pieces:
            start = a
            while True:
                end = min(start + size, b)
                out.append((start, end))
                if end >= b:
                    break
                start += stride
        return out

    @staticmethod
    def _distinct(text: str, offsets: list[tuple[int, int]],
                  spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The first of each set of windows with the same text (same text, same scores)."""
        seen: dict[str, tuple[int, int]] = {}
        for a, b in spans:
            seen.setdefault(text[offsets[a][0]:offsets[b - 1][1]], (a, b))
        return list(seen.values())

    @staticmethod
    def _sentences(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Token index spans of sentences: split after ".", "!", "?" or before a line break."""
        spans, start = [], 0
        for k in range(len(offsets)):
            piece = text[offsets[k][0]:offsets[k][1]]
            next_gap = text[offsets[k][1]:offsets[k + 1][0]] if k + 1 < len(offsets) else ""
            if piece in {".", "!", "?"} or "\n" in next_gap:
                spans.append((start, k + 1))
                start = k + 1
        if start < len(offsets):
            spans.append((start, len(offsets)))
        return spans

    def embed_windows(self, windows: list[Window]) -> np.ndarray:
        """(len(windows), 7, 384): one unit vector per layer; each window run alone (see above)."""
        if not windows:
            return np.zeros((0, self.layers, self.dimension), dtype=np.float32)
        if self._pool is None or len(windows) == 1:
            pooled = [self._run(w) for w in windows]
        else:
            pooled = list(self._pool.map(self._run, windows))
        return _unit(np.stack(pooled))

    def _run(self, window: Window) -> np.ndarray:
        ids = np.array([window.ids], dtype=np.int64)
        return self.session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                       "token_type_ids": np.zeros_like(ids)})[0][0]

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 7, 384): per text, the mean of its (distinct) windows' vectors, renormalized.

        Training uses it; every training text fits one window, so this is that window's vector.
        """
        wins = self.windows(texts)
        vecs = self.embed_windows(wins)
        out = np.zeros((len(texts), self.layers, self.dimension), dtype=np.float32)
        for w, v in zip(wins, vecs, strict=True):
            out[w.text_index] += v
        return _unit(out)


def _sentence_pieces(sentences: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Every sentence, and every pair of adjacent sentences that fits `size` tokens."""
    pairs = [(sentences[k][0], sentences[k + 1][1]) for k in range(len(sentences) - 1)
             if sentences[k + 1][1] - sentences[k][0] <= size]
    return [*sentences, *pairs]


def _packed_pieces(sentences: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Consecutive whole sentences merged up to `size` tokens, plus each seam between two packs
    (the last sentence of one with the first of the next) that fits."""
    packs: list[list[tuple[int, int]]] = []
    for sentence in sentences:
        if packs and sentence[1] - packs[-1][0][0] <= size:
            packs[-1].append(sentence)
        else:
            packs.append([sentence])
    seams = [(packs[k][-1][0], packs[k + 1][0][1]) for k in range(len(packs) - 1)
             if packs[k + 1][0][1] - packs[k][-1][0] <= size]
    return [*((p[0][0], p[-1][1]) for p in packs), *seams]


def _unit(x: np.ndarray) -> np.ndarray:
    """L2-normalize along the last axis."""
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)
