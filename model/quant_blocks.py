"""4- and 8-bit weight blocks: read the GGUF's, make them from float32, pack them for ONNX Runtime.

The GGUF already holds the model in 4 bits (Q4_1 blocks, a Q8_0 embedding that is also the tied LM
head). Dequantizing to float32 and letting the builder quantize again adds a second rounding that
costs half the quiz answers (``shared/model-notes.md``). This module carries the GGUF's own blocks
into ONNX Runtime's kernels instead, exactly:

* Q4_1 (per 32 weights a scale ``d`` and a min ``m``; ``w = d*q + m``, ``q`` in 0..15) becomes
  ``MatMulNBits`` bits=4 with its default zero point 8 (``w' = d*(q - 8)``) plus a correction
  ``blocksum32(x) @ (m + 8d)^T`` that ``model.carry_blocks`` adds outside the kernel ("split").
  A float zero point would be exact inside the kernel too, but that path dequantizes on every call
  (measured 12-50x slower).
* Q8_0 (``w = d*q``, ``q`` int8) becomes bits=8 with the default zero point 128 and stored values
  ``q + 128``: bit-exact, read by both the LM head's ``MatMulNBits`` and the embedding's
  ``GatherBlockQuantized``.

The same blocks can be made from float32 weights (:func:`quantize_q4_1`, :func:`quantize_q8_0`,
ggml's reference rounding), which is how an RLHF child keeps the served build's fidelity.
Pure NumPy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
Q4_1_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles
Q8_0_BYTES = 34  # fp16 d, 32 int8


@dataclass(frozen=True)
class Q4Blocks:
    """Asymmetric 4-bit blocks of a [N, K] weight (rows are output features): ``w = d*q + m``."""

    q: np.ndarray  # uint8 [N, K], values 0..15
    d: np.ndarray  # float32 [N, K/32]
    m: np.ndarray  # float32 [N, K/32]

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        q = self.q.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
        return (q * self.d[..., None] + self.m[..., None]).reshape(n, k)

    def rows(self, index: np.ndarray | slice) -> Q4Blocks:
        return Q4Blocks(self.q[index], self.d[index], self.m[index])


@dataclass(frozen=True)
class Q8Blocks:
    """Symmetric 8-bit blocks of a [N, K] weight: ``w = d*q``."""

    q: np.ndarray  # int8 [N, K]
    d: np.ndarray  # float32 [N, K/32]

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        q = self.q.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
        return (q * self.d[..., None]).reshape(n, k)


def concat(parts: list[Q4Blocks]) -> Q4Blocks:
    """Blocks of row-stacked weights (the builder fuses q, k and v into one [N_q+N_k+N_v, K])."""
    return Q4Blocks(np.concatenate([p.q for p in parts]), np.concatenate([p.d for p in parts]),
                    np.concatenate([p.m for p in parts]))


# -- the GGUF's bytes --------------------------------------------------------------------------
def parse_q4_1(raw: np.ndarray) -> Q4Blocks:
    """GGUF Q4_1 rows ([N, K/32*20] uint8) as blocks.

    Element j of a block is the low nibble of byte j, element j+16 its high nibble.
    """
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, -1, Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, nb, 32]
    return Q4Blocks(q.reshape(n, -1), d, m)


def parse_q8_0(raw: np.ndarray) -> Q8Blocks:
    """GGUF Q8_0 rows ([N, K/32*34] uint8) as blocks."""
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, -1, Q8_0_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8)
    return Q8Blocks(q.reshape(n, -1), d)


def unpermute_rows(index_count: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (rotary halves interleaved per head).

    llama.cpp's converter stores ``w.reshape(H, 2, D/2, ...).swapaxes(1, 2)``; the Hugging Face
    checkpoint (and so the builder's graph) has the rows in the original order.
    """
    head_dim = index_count // n_head
    rows = np.arange(index_count).reshape(n_head, head_dim // 2, 2).swapaxes(1, 2)
    return rows.reshape(-1)


# -- float32 -> blocks (ggml's reference quantizers) -------------------------------------------
def quantize_q4_1(w: np.ndarray) -> Q4Blocks:
    """ggml's ``quantize_row_q4_1_ref``: per block min and (max - min)/15, round to nearest.

    Scale and min are rounded to fp16 first (as the GGUF stores them), and the nibbles are chosen
    against those rounded values, so the blocks are what a Q4_1 GGUF of ``w`` would hold.
    """
    n, k = w.shape
    x = np.asarray(w, dtype=np.float32).reshape(n, k // BLOCK, BLOCK)
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    d = ((hi - lo) / 15.0).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.floor((x - m[..., None]) * inv[..., None] + 0.5), 0, 15).astype(np.uint8)
    return Q4Blocks(q.reshape(n, k), d, m)


def quantize_q8_0(w: np.ndarray) -> Q8Blocks:
    """ggml's ``quantize_row_q8_0_ref``: per block d = max|w|/127, q = round(w/d)."""
    n, k = w.shape
    x = np.asarray(w, dtype=np.float32).reshape(n, k // BLOCK, BLOCK)
    d = (np.abs(x).max(axis=-1) / 127.0).astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(x * inv[..., None]), -127, 127).astype(np.int8)
    return Q8Blocks(q.reshape(n, k), d)


# -- ONNX Runtime's layouts --------------------------------------------------------------------
def pack_matmul_nbits_4(blocks: Q4Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B [N, K/32, 16] uint8, scales [N, K/32] float32, correction [N, K/32] float32)``.

    ``MatMulNBits`` reads elements 2i and 2i+1 of a block from byte i, low nibble first, with the
    default zero point 8: it computes ``x @ (d*(q-8))^T``; ``x @ W^T`` needs ``+ blocksum32(x) @
    correction^T`` with ``correction = m + 8d``.
    """
    n, k = blocks.q.shape
    q = blocks.q.reshape(n, k // BLOCK, BLOCK // 2, 2)
    packed = (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)
    correction = (blocks.m + 8.0 * blocks.d).astype(np.float32)
    return packed, blocks.d.astype(np.float32), correction


def unpack_matmul_nbits(packed: np.ndarray, scales: np.ndarray, bits: int, k: int | None = None) -> np.ndarray:
    """The float32 [N, K] weight of any ``MatMulNBits`` node without zero points (the default,
    2^(bits-1)), from its ``B`` [N, K/block, block*bits/8] and ``scales`` (block size from the shapes)."""
    n, blocks, width = packed.shape
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, width * 2)
    elif bits == 8:
        q = packed
    else:
        raise ValueError(f"{bits}-bit MatMulNBits is not supported")
    w = (q.astype(np.float32) - float(1 << (bits - 1))) * scales.reshape(n, blocks, 1).astype(np.float32)
    return w.reshape(n, -1)[:, :k]


def unpack_matmul_nbits_4(packed: np.ndarray, scales: np.ndarray,
                          correction: np.ndarray) -> np.ndarray:
    """The float32 [N, K] weight that a packed 4-bit node plus its correction computes with."""
    return unpack_matmul_nbits(packed, scales, 4) + np.repeat(correction, BLOCK, axis=1)


def pack_matmul_nbits_8(blocks: Q8Blocks) -> tuple[np.ndarray, np.ndarray]:
    """``(B [N, K/32, 32] uint8 = q + 128, scales [N, K/32])``: bit-exact with the default zero point."""
    n, k = blocks.q.shape
    stored = (blocks.q.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // BLOCK, BLOCK)
    return stored, blocks.d.astype(np.float32)


def unpack_matmul_nbits_8(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 [N, K] weight of a packed 8-bit node (default zero point 128)."""
    return unpack_matmul_nbits(packed, scales, 8)
