"""The ``colloquy.ai::Q41LutMatMul`` ONNX Runtime custom op: build it, lay weights out for it, load it.

Float32 activations x the GGUF's Q4_1 blocks by table lookup (``bench/kernels/q4_1_gemv.c``
ported to Rust in ``model/kernels/q4_lut``): the ``cpu-int4-gguf-lut`` build's 4-bit products
(``model.lut_graph`` writes them). The op takes ``A`` float32 ``[..., K]``, ``W`` uint32 ``[N/16, K/32, 4, 16]``,
``D`` and ``Mn`` float32 ``[N/16, K/32, 16]`` (:func:`lut_layout` makes the last three) and returns
``Y`` float32 ``[..., N]``. Setting ``COLLOQUY_Q4_LUT_SCALAR=1`` before a session is created makes
its kernels use the portable scalar path instead of AVX-512.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

CRATE = Path(__file__).resolve().parent / "kernels" / "q4_lut"
LIBRARY = CRATE / "target" / "release" / "libcolloquy_q4_lut.so"
DOMAIN = "colloquy.ai"
OP = "Q41LutMatMul"
SCALAR_ENV = "COLLOQUY_Q4_LUT_SCALAR"


def sources() -> list[Path]:
    """The files the library is built from (a change rebuilds it, and the builds that carry it)."""
    return [CRATE / "Cargo.toml", CRATE / "Cargo.lock", *sorted((CRATE / "src").rglob("*.rs"))]


def library_path(build: bool = True) -> Path:
    """The op's shared library, built first with cargo when missing or older than its sources.

    Raises ``FileNotFoundError`` when it must be built and ``build`` is false or cargo is not
    installed, and ``RuntimeError`` when cargo fails (with cargo's output).
    """
    newest = max(p.stat().st_mtime for p in sources() if p.is_file())
    if LIBRARY.is_file() and LIBRARY.stat().st_mtime >= newest:
        return LIBRARY
    if not build:
        raise FileNotFoundError(f"{LIBRARY} is missing or stale; build it with "
                                f"`cargo build --release --manifest-path {CRATE / 'Cargo.toml'}`")
    cargo = shutil.which("cargo")
    if cargo is None:
        raise FileNotFoundError(f"cargo (Rust) is not installed: it is needed to build {LIBRARY.name} "
                                f"from {CRATE} (install Rust from https://rustup.rs)")
    proc = subprocess.run([cargo, "build", "--release", "--manifest-path", str(CRATE / "Cargo.toml")],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not LIBRARY.is_file():
        raise RuntimeError(f"cargo build of {CRATE} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    LIBRARY.touch()  # cargo leaves an up-to-date output's mtime alone: make the check above hold
    return LIBRARY


def lut_layout(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> dict[str, np.ndarray]:
    """Q4_1 blocks in the op's layout (the C kernel's ``lut_tile``'s): ``{"W", "D", "Mn"}``.

    ``q`` uint8 ``[N, K/32, 32]`` (values 0..15, element j of block b is weight 32b+j), ``d`` and ``m``
    float32 ``[N, K/32]``, N a multiple of 16. Weights go in groups of 4, two groups to a pair, four
    pairs to a block; for each tile of 16 rows, block and pair, ``W`` holds one dword per row whose
    nibble ``4*g + k`` is the row's bit plane k of group g of the pair (bit j: weight j of the group),
    so one ``vpermps`` looks up 16 rows at once. ``D``/``Mn`` are the scales and mins per tile, block
    and row.
    """
    q = np.asarray(q)
    n, kb, width = q.shape
    if width != 32 or n % 16 or d.shape != (n, kb) or m.shape != (n, kb):
        raise ValueError(f"want q [N, K/32, 32] with N % 16 == 0 and d, m [N, K/32]; "
                         f"got q {q.shape}, d {d.shape}, m {m.shape}")
    if q.size and int(q.max()) > 15:
        raise ValueError("q holds values above 15: not 4-bit")
    groups = q.reshape(n, kb, 4, 2, 4).astype(np.uint32)  # row, block, pair, group of the pair, weight
    planes = (groups[..., None] >> np.arange(4, dtype=np.uint32)) & 1  # ..., weight, plane
    pattern = (planes << np.arange(4, dtype=np.uint32)[:, None]).sum(axis=4, dtype=np.uint32)  # ..., group, plane
    shifts = (4 * (4 * np.arange(2)[:, None] + np.arange(4)[None, :])).astype(np.uint32)
    words = (pattern << shifts).sum(axis=(3, 4), dtype=np.uint32)  # row, block, pair (nibbles never overlap)
    tiles = n // 16

    def per_tile(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(tiles, 16, *a.shape[1:]).transpose(0, *range(2, a.ndim + 1), 1))

    return {"W": per_tile(words), "D": per_tile(np.asarray(d, np.float32)), "Mn": per_tile(np.asarray(m, np.float32))}


def dequantize(w: np.ndarray, d: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The float32 ``[N, K]`` weight that the op computes with: :func:`lut_layout` undone."""
    tiles, kb, pairs, lanes = w.shape
    if (pairs, lanes) != (4, 16) or d.shape != (tiles, kb, 16) or mn.shape != (tiles, kb, 16):
        raise ValueError(f"want W [N/16, K/32, 4, 16] and D, Mn [N/16, K/32, 16]; got W {w.shape}, "
                         f"D {d.shape}, Mn {mn.shape}")
    n = tiles * 16
    words = np.asarray(w, np.uint32).transpose(0, 3, 1, 2).reshape(n, kb, 4)  # row, block, pair
    nibbles = (words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15  # ..., 4*group + plane
    planes = nibbles.reshape(n, kb, 4, 2, 4)  # row, block, pair, group, plane
    bits = (planes[..., None] >> np.arange(4, dtype=np.uint32)) & 1  # ..., plane, weight
    q = (bits << np.arange(4, dtype=np.uint32)[:, None]).sum(axis=4).reshape(n, kb, 32)

    def per_row(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float32).transpose(0, 2, 1).reshape(n, kb)

    return (per_row(d)[..., None] * q.astype(np.float32) + per_row(mn)[..., None]).reshape(n, kb * 32)


def session_options(threads: int | None = None, build: bool = True) -> Any:
    """``onnxruntime.SessionOptions`` with the op's library registered (and ``threads`` intra-op threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    so.register_custom_ops_library(str(library_path(build=build)))
    return so
