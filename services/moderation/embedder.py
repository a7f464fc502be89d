"""Sentence embeddings from the exported all-MiniLM-L6-v2 on ONNX Runtime (CPU), no torch.

The graph returns the attention-masked mean of every layer's hidden states (embedding layer +
6 transformer layers); each is L2-normalized here. Layer 6 is the usual sentence embedding
(sentence-transformers' mean pooling + normalize); the middle layers keep more of what a text
*asks for* (syntax, intent) than the last one, which is tuned for topic similarity, so the
classifier reads several of them.

Texts longer than one window are split into overlapping token windows, each embedded on its own,
so a harmful sentence deep inside a long answer is not averaged away (the caller takes the
maximum score over a text's windows).

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
        self.threads = threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="embed") if self.threads > 1 else None
        self.cls_id = self._tok.token_to_id("[CLS]")
        self.sep_id = self._tok.token_to_id("[SEP]")

    @property
    def model_id(self) -> str:
        return f"{paths.EMBEDDER_NAME}-onnx-{self.precision}@{self.manifest.get('build_id', '?')}"

    def windows(self, texts: list[str]) -> list[Window]:
        """The spans of each text to embed.

        A text that fits one window is one window (as in training). A longer text is cut into
        sentences, and each sentence and each pair of adjacent sentences is a window (sentences
        longer than a window are cut into overlapping token windows): one hateful sentence in a
        long answer is scored nearly on its own instead of being averaged with its neighbours.
        """
        with self._lock:  # Tokenizer objects are not documented as thread-safe
            encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        out: list[Window] = []
        for i, enc in enumerate(encodings):
            ids, offsets = enc.ids, enc.offsets
            if len(ids) <= self.window_tokens:
                out.append(Window(i, 0, len(texts[i]), [self.cls_id, *ids, self.sep_id]))
                continue
            spans = self._sentences(texts[i], offsets)
            pieces = [(a, b) for a, b in spans]
            pieces += [(spans[k][0], spans[k + 1][1]) for k in range(len(spans) - 1)
                       if spans[k + 1][1] - spans[k][0] <= self.window_tokens]
            for a, b in pieces:
                start = a
                while True:
                    end = min(start + self.window_tokens, b)
                    out.append(Window(i, offsets[start][0], offsets[end - 1][1],
                                      [self.cls_id, *ids[start:end], self.sep_id]))
                    if end >= b:
                        break
                    start += self.stride_tokens
        return out

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
        """(len(texts), 7, 384): per text, the mean of its windows' vectors, renormalized."""
        wins = self.windows(texts)
        vecs = self.embed_windows(wins)
        out = np.zeros((len(texts), self.layers, self.dimension), dtype=np.float32)
        for w, v in zip(wins, vecs, strict=True):
            out[w.text_index] += v
        return _unit(out)


def _unit(x: np.ndarray) -> np.ndarray:
    """L2-normalize along the last axis."""
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)
