"""One model version on a plain `onnxruntime.InferenceSession`, and its two kinds of forward pass.

The ORT GenAI builder's graph (engine-notes.md): inputs `input_ids` [B, S], `attention_mask`
[B, total] and `past_key_values.N.{key,value}` [B, kv_heads, past, head_dim]; outputs `logits`
([B, S, V], or [B, 1, V] when the builder pruned to the last position) and `present.N.*`.
GroupQueryAttention takes each row's length from its mask's count of ones, so:
- a *prefill* pass is batch 1 (the op refuses several new tokens per row with past at B > 1):
  one chunk of one prompt into the staging slot;
- a *decode* pass is one token for each of rows 0..B-1, whatever their lengths.
`present` is bound to the same memory as `past` (IOBinding), so the op writes in place.
ORT GenAI is not used here: its builder makes the model, `tokenizers` reads its tokenizer.json.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model.chat_template import IM_END, IM_START
from model.lut_graph import custom_ops_library
from model.sampling import COPY_KEYS
from model.sampling import SMOLLM2_135M_INSTRUCT as BASE_SAMPLING
from services.generation.kv_cache import SlotKV
from services.generation.repeats import CopyGuard, earlier_answers, last_user_turn
from services.generation.schema import Sampling

log = logging.getLogger(__name__)

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def cuda_device_count() -> int:
    """GPUs the NVIDIA driver reports; 0 without a driver (an installed CUDA build proves nothing)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def resolve_provider(requested: str) -> str:
    """"auto" -> "cuda" when a GPU is present, else "cpu"; explicit values pass through."""
    requested = (requested or "auto").lower()
    if requested not in {"auto", "cuda", "cpu"}:
        raise ValueError(f"provider must be auto, cuda or cpu, not {requested!r}")
    if requested != "auto":
        return requested
    return "cuda" if cuda_device_count() > 0 else "cpu"


def sampling_defaults(path: Path, genai_config: dict[str, Any]) -> dict[str, Any]:
    """A model directory's default sampling: its registry manifest's ``sampling`` (a registry
    version's directory holds its manifest), else the base model's (``model.sampling``); top_k
    falls back to the model's own ``genai_config`` value."""
    from model.sampling import defaults_for

    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    out = defaults_for(manifest)
    search = genai_config.get("search", {})
    out.setdefault("temperature", 0.0)  # what a manifest leaves out: neutral values
    out.setdefault("candidates_temperature", out["temperature"])
    out.setdefault("top_p", 1.0)
    out.setdefault("top_k", int(search.get("top_k", 50) or 0))
    out.setdefault("repetition_penalty", 1.0)
    out.setdefault("repetition_window", 64)
    for key in COPY_KEYS:  # versions recorded before the copy guard get the base model's
        out.setdefault(key, BASE_SAMPLING[key])
    return out


class LoadedModel:
    """One model version: its session, tokenizer and the graph facts the scheduler needs."""

    def __init__(self, path: str | Path, version: str, provider: str = "auto", threads: int = 0,
                 spin: bool = False, float32_rows: int = 0) -> None:
        import onnxruntime as ort
        import tokenizers

        self.path = Path(path)
        self.version = version
        self.provider = resolve_provider(provider)
        started = time.perf_counter()
        doc = json.loads((self.path / "genai_config.json").read_text(encoding="utf-8"))
        m, dec = doc["model"], doc["model"]["decoder"]
        self.context_length = int(m.get("context_length") or doc["search"]["max_length"])
        self.sampling = sampling_defaults(self.path, doc)
        self.top_k = int(self.sampling["top_k"])
        eos = m.get("eos_token_id", [])
        self.eos = frozenset(int(t) for t in (eos if isinstance(eos, list) else [eos]))
        self.layers = int(dec["num_hidden_layers"])
        self.kv_heads, self.head_dim = int(dec["num_key_value_heads"]), int(dec["head_size"])
        names = dec["inputs"]
        self.past = [(names["past_key_names"] % i, names["past_value_names"] % i) for i in range(self.layers)]
        outs = dec["outputs"]
        self.present = [(outs["present_key_names"] % i, outs["present_value_names"] % i) for i in range(self.layers)]
        self.input_ids, self.mask, self.logits = names["input_ids"], names["attention_mask"], outs["logits"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        library = custom_ops_library(self.path, doc)
        if library is not None:  # a table-lookup build's 4-bit products (model/lut_graph.py)
            opts.register_custom_ops_library(str(library))
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.provider == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": 0}))
        self.session = ort.InferenceSession(str(self.path / dec["filename"]), opts, providers=providers)
        # Passes over at least `float32_rows` rows or prompt tokens run on a float32 copy of the
        # weights (CPU, block-quantized builds; model/float32_copy.py says why); 0: all on `session`.
        self.float32_rows = 0
        self.float32_session: Any = None
        if float32_rows and self.provider == "cpu":
            self.float32_session = _float32_session(self.path / dec["filename"], opts, providers)
            self.float32_rows = float32_rows if self.float32_session is not None else 0
        ins = {i.name: i for i in self.session.get_inputs()}
        out = {o.name: o for o in self.session.get_outputs()}
        self.kv_dtype = _DTYPES[ins[self.past[0][0]].type]
        self.logits_dtype = _DTYPES[out[self.logits].type]
        self.vocab = int(out[self.logits].shape[-1])
        self.last_only = out[self.logits].shape[1] == 1  # builder pruned logits to the last position
        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.path / "tokenizer.json"))
        # ChatML's openings of an answer and a user turn, and their end: where the copy guard finds
        # earlier answers and the user's last turn
        self.answer_header = self.encode(f"{IM_START}assistant\n")
        self.user_header = self.encode(f"{IM_START}user\n")
        self.line_breaks = tuple(self.encode("\n"))
        self.turn_end = self.tokenizer.token_to_id(IM_END)
        if self.turn_end is None:
            self.turn_end = -2  # no such token: no answer ever ends, the guard finds none
        log.info("model loaded", extra={"model_version": version, "path": str(self.path), "provider": self.provider,
                                        "context_length": self.context_length,
                                        "load_s": round(time.perf_counter() - started, 3)})

    def session_for(self, rows: int) -> Any:
        """The session a pass over `rows` rows (decode) or tokens (a prefill chunk) runs on."""
        if self.float32_rows and rows >= self.float32_rows:
            return self.float32_session
        return self.session

    def resolve(self, sampling: Sampling) -> Sampling:
        """``sampling`` with every unset model-dependent field taken from this version's defaults
        (several candidates get the version's ``candidates_temperature``: greedy ones would be equal)."""
        d = self.sampling
        default_temperature = d["temperature"] if sampling.n == 1 else d["candidates_temperature"]
        return dataclasses.replace(
            sampling,
            temperature=default_temperature if sampling.temperature is None else sampling.temperature,
            top_p=d["top_p"] if sampling.top_p is None else sampling.top_p,
            top_k=self.top_k if sampling.top_k is None else sampling.top_k,
            repetition_penalty=(d["repetition_penalty"] if sampling.repetition_penalty is None
                                else sampling.repetition_penalty),
            copy_penalty=d["copy_penalty"] if sampling.copy_penalty is None else sampling.copy_penalty)

    def copy_guard(self, ids: list[int], multiplier: float) -> Callable[[], CopyGuard] | None:
        """A maker of fresh copy guards (one per candidate) for answers to `ids`, or None when
        the guard is off or the prompt holds neither an earlier answer nor a user turn."""
        if multiplier <= 0:
            return None
        answers = earlier_answers(ids, self.answer_header, self.turn_end)
        echo = last_user_turn(ids, self.user_header, self.turn_end)
        if not answers and not echo:
            return None
        d = self.sampling
        base, allowed = float(d["copy_base"]), int(d["copy_allowed"])
        ends = sorted(self.eos)
        breaks = self.line_breaks
        return lambda: CopyGuard(answers, multiplier, base, allowed, ends, echo, breaks)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize

    def new_kv(self, slots: int, tokens: int) -> SlotKV:
        return SlotKV(self.layers, self.kv_heads, self.head_dim, slots, tokens, self.kv_dtype,
                      "cuda" if self.provider == "cuda" else "cpu")


def _float32_session(path: Path, opts: Any, providers: list[Any]) -> Any:
    """A session over the float32 copy of the graph at `path`; None for a graph with nothing to
    unpack (a float32 build) or when building it fails (the quantized graph serves alone).

    The copy's weights go to a temporary file, one tensor at a time, and the graph refers to them:
    ONNX Runtime maps them, packs them for its MatMul kernels and unmaps them, so the process keeps
    only the packed copy (+0.47 GB resident for SmolLM2-135M, no higher peak) and nothing holds
    the deleted file (an emptyDir /tmp in k8s). A session from bytes kept the serialized model
    besides (+1.2 GB).
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    from model.float32_copy import Float32CopyError, float32_copy

    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="colloquy-float32-") as tmp:
            graph, counts = float32_copy(path, Path(tmp) / "weights.bin")
            onnx.save_model(graph, f"{tmp}/model.onnx")
            del graph
            session = ort.InferenceSession(f"{tmp}/model.onnx", opts, providers=providers)
    except Float32CopyError as exc:
        log.info("no float32 copy of the weights", extra={"reason": str(exc)})
        return None
    except Exception as exc:  # a full /tmp, say
        log.warning("no float32 copy of the weights: building it failed", exc_info=exc)
        return None
    log.info("float32 copy of the weights loaded", extra={"counts": dict(counts),
                                                           "load_s": round(time.perf_counter() - started, 3)})
    return session


class Forward:
    """The two passes over one SlotKV, with IOBindings kept between calls (rebound only on change)."""

    def __init__(self, model: LoadedModel, kv: SlotKV) -> None:
        self.model, self.kv = model, kv
        self._dev = "cuda" if kv.device == "cuda" else "cpu"
        sessions = [s for s in (model.session, model.float32_session) if s is not None]
        # One decode and one prefill binding per session, each rebound only when its shape changes.
        self._decode = {id(s): [s.io_binding(), 0] for s in sessions}
        self._decode_logits = kv.host_array((kv.slots, 1, model.vocab), model.logits_dtype)
        self._prefill = {id(s): [s.io_binding(), 0] for s in sessions}
        self._prefill_logits = np.empty((1, 1, model.vocab), model.logits_dtype)
        for io, _ in self._prefill.values():
            self._bind_kv(io, kv.staging, 1)

    def _bind_kv(self, io: Any, slot: int, rows: int) -> None:
        kv = self.kv
        shape = [rows, kv.heads, kv.tokens, kv.dim]
        for layer, (names_in, names_out) in enumerate(zip(self.model.past, self.model.present, strict=True)):
            for kind in range(2):
                ptr = kv.ptr(layer, kind, slot)
                io.bind_input(names_in[kind], self._dev, 0, kv.dtype.type, shape, ptr)
                io.bind_output(names_out[kind], self._dev, 0, kv.dtype.type, shape, ptr)

    def _run(self, io: Any, session: Any = None) -> None:
        (session or self.model.session).run_with_iobinding(io)
        if self._dev != "cpu":
            io.synchronize_outputs()

    def prefill(self, ids: list[int], past: int) -> np.ndarray:
        """Prefill `ids` at positions past.. of the staging slot; the last position's logits [V] (a copy)."""
        m, n = self.model, len(ids)
        session = m.session_for(n)
        binding = self._prefill[id(session)]
        io = binding[0]
        width = 1 if m.last_only else n
        if width > self._prefill_logits.shape[1]:
            self._prefill_logits = np.empty((1, width, m.vocab), m.logits_dtype)
            for other in self._prefill.values():
                other[1] = 0  # bound to the old buffer
        if width != binding[1]:
            io.bind_output(m.logits, "cpu", 0, m.logits_dtype, [1, width, m.vocab], self._prefill_logits.ctypes.data)
            binding[1] = width
        io.bind_cpu_input(m.input_ids, np.asarray([ids], dtype=np.int64))
        io.bind_cpu_input(m.mask, np.ones((1, past + n), dtype=np.int64))
        self._run(io, session)
        return np.array(self._prefill_logits[0, width - 1], dtype=np.float32)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One token for each row 0..B-1 (row i holds lengths[i] positions); logits [B, V] in the
        model's logits dtype (float16 for a GPU build: converting the whole batch to float32
        would cost more than the pass; the sampler reads each row as it needs).

        The result is a view of the bound buffer: valid until the next decode pass.
        """
        m, rows = self.model, len(tokens)
        session = m.session_for(rows)
        binding = self._decode[id(session)]
        io = binding[0]
        if rows != binding[1]:
            self._bind_kv(io, 0, rows)
            io.bind_output(m.logits, "cpu", 0, m.logits_dtype, [rows, 1, m.vocab], self._decode_logits.ctypes.data)
            binding[1] = rows
        width = int(lengths.max()) + 1
        mask = (np.arange(width)[None, :] <= lengths[:, None]).astype(np.int64)
        io.bind_cpu_input(m.input_ids, tokens.reshape(rows, 1).astype(np.int64))
        io.bind_cpu_input(m.mask, mask)
        self._run(io, session)
        return self._decode_logits[:rows, 0]
