"""Preallocated KV slot buffers that the graph updates in place.

Per layer one key and one value buffer of shape [slots, kv_heads, slot_tokens, head_dim]. A
decode pass over B rows binds the first-axis view [0:B] of every buffer as both `past` and
`present` (GroupQueryAttention writes each row's new K/V at its own length), so nothing is copied
per step; that is why running rows must sit in slots 0..B-1 (`move` compacts them). The last slot
is the staging slot where a prompt is prefilled (batch 1) before its candidates join the batch.

On CPU the buffers are NumPy arrays; on CUDA they are device OrtValues and the few copies between
slots and to/from the prefix cache go through the CUDA runtime (cudaMemcpy2D), never per step; the
host buffer the logits come back into every step is page-locked (`host_array`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys
import weakref
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _cudart_candidates() -> list[str]:
    """Where libcudart may be: the nvidia-* wheels beside ONNX Runtime or in any other site dir on
    sys.path (a CUDA 13 wheel keeps it in nvidia/cu13/lib), then the loader's own search by soname
    (wheels and toolkits ship only versioned names, e.g. libcudart.so.13)."""
    import onnxruntime

    dirs = [os.path.dirname(os.path.dirname(onnxruntime.__file__)), *sys.path]
    found = [path for d in dict.fromkeys(dirs) if d
             for path in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", "libcudart.so*")), reverse=True)]
    return [*found, "libcudart.so.13", "libcudart.so.12", "libcudart.so", ctypes.util.find_library("cudart") or ""]


def _load_cudart() -> Any:
    """The CUDA runtime library: the first candidate that loads."""
    for name in _cudart_candidates():
        if not name or name.endswith(".a"):
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("libcudart not found: the CUDA runtime is needed to copy KV on the device")


class _Cuda:
    """The three copies the slot manager needs, as cudaMemcpy2D calls (kinds: 1 H2D, 2 D2H, 3 D2D)."""

    def __init__(self, device_id: int) -> None:
        self.lib = _load_cudart()
        self.lib.cudaSetDevice(device_id)
        self.lib.cudaMemcpy2D.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                          ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A NumPy array in page-locked host memory (cudaMallocHost), freed with its buffer: the
        logits come back into it every decode pass, and a copy into pageable memory goes through
        a staging buffer at a fraction of the bus's speed."""
        nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        ptr = ctypes.c_void_p()
        rc = self.lib.cudaMallocHost(ctypes.byref(ptr), ctypes.c_size_t(nbytes))
        if rc != 0 or not ptr.value:
            raise RuntimeError(f"cudaMallocHost failed with CUDA error {rc}")
        buf = (ctypes.c_char * nbytes).from_address(ptr.value)
        weakref.finalize(buf, self.lib.cudaFreeHost, ctypes.c_void_p(ptr.value))
        return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: int) -> None:
        self.lib.cudaDeviceSynchronize()  # ORT's stream may still be writing the buffers
        rc = self.lib.cudaMemcpy2D(dst, dpitch, src, spitch, width, height, kind)
        if rc != 0:
            raise RuntimeError(f"cudaMemcpy2D failed with CUDA error {rc}")


class SlotKV:
    """KV of `slots` rows (the last one is the staging slot) for every layer of one model."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int, tokens: int,
                 dtype: np.dtype, device: str = "cpu", device_id: int = 0) -> None:
        self.layers, self.heads, self.dim, self.slots, self.tokens = layers, kv_heads, head_dim, slots, tokens
        self.dtype = np.dtype(dtype)
        self.device, self.device_id = device, device_id
        self.shape = (slots, kv_heads, tokens, head_dim)
        self.item = self.dtype.itemsize
        self.slot_bytes = kv_heads * tokens * head_dim * self.item
        self.bytes_per_token = layers * 2 * kv_heads * head_dim * self.item
        self._cuda: _Cuda | None = None
        if device == "cuda":
            import onnxruntime as ort

            self._cuda = _Cuda(device_id)
            self._values = [[ort.OrtValue.ortvalue_from_shape_and_type(list(self.shape), self.dtype.type, "cuda",
                                                                       device_id) for _ in range(2)]
                            for _ in range(layers)]
            self._base = [[v.data_ptr() for v in pair] for pair in self._values]
            self._host: list[list[np.ndarray]] = []
        else:
            # np.zeros maps pages lazily: slots never used cost no resident memory.
            self._host = [[np.zeros(self.shape, self.dtype) for _ in range(2)] for _ in range(layers)]
            self._base = [[a.ctypes.data for a in pair] for pair in self._host]

    @property
    def staging(self) -> int:
        return self.slots - 1

    @property
    def nbytes(self) -> int:
        return self.layers * 2 * self.slots * self.slot_bytes

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A host array for outputs copied back every pass: page-locked on CUDA (plain memory when
        the runtime refuses to lock it), plain NumPy on CPU."""
        if self._cuda is not None:
            try:
                return self._cuda.host_array(shape, dtype)
            except RuntimeError:
                log.warning("page-locked host memory refused; logits come back through pageable memory")
        return np.empty(shape, dtype)

    def ptr(self, layer: int, kind: int, slot: int) -> int:
        """Address of slot `slot` of layer `layer`'s key (kind 0) or value (kind 1) buffer."""
        return self._base[layer][kind] + slot * self.slot_bytes

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (compaction, n copies)."""
        if src == dst or length <= 0:
            return
        if self._cuda is None:
            for pair in self._host:
                for a in pair:
                    a[dst, :, :length] = a[src, :, :length]
            return
        pitch, width = self.tokens * self.dim * self.item, length * self.dim * self.item
        for layer in range(self.layers):
            for kind in range(2):
                self._cuda.copy2d(self.ptr(layer, kind, dst), pitch, self.ptr(layer, kind, src), pitch,
                                  width, self.heads, 3)

    def read(self, slot: int, start: int, end: int) -> np.ndarray:
        """Host copy of positions [start, end) of a slot: [layers, 2, kv_heads, end-start, head_dim]."""
        if self._cuda is None:
            return np.stack([np.stack([a[slot, :, start:end] for a in pair]) for pair in self._host])
        out = np.empty((self.layers, 2, self.heads, end - start, self.dim), self.dtype)
        pitch, width = self.tokens * self.dim * self.item, (end - start) * self.dim * self.item
        for layer in range(self.layers):
            for kind in range(2):
                dst = out[layer, kind]
                self._cuda.copy2d(dst.ctypes.data, width, self.ptr(layer, kind, slot) + start * self.dim * self.item,
                                  pitch, width, self.heads, 2)
        return out

    def write(self, slot: int, start: int, data: np.ndarray) -> None:
        """Put `data` ([layers, 2, kv_heads, n, head_dim], host) at positions [start, start+n) of a slot."""
        n = data.shape[3]
        if self._cuda is None:
            for layer, pair in enumerate(self._host):
                for kind, a in enumerate(pair):
                    a[slot, :, start:start + n] = data[layer, kind]
            return
        data = np.ascontiguousarray(data, dtype=self.dtype)
        pitch, width = self.tokens * self.dim * self.item, n * self.dim * self.item
        for layer in range(self.layers):
            for kind in range(2):
                self._cuda.copy2d(self.ptr(layer, kind, slot) + start * self.dim * self.item, pitch,
                                  data[layer, kind].ctypes.data, width, width, self.heads, 1)
