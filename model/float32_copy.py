"""A float32 copy of a block-quantized graph, for passes over many rows on a CPU.

ONNX Runtime's ``MatMulNBits`` at float32 activations (accuracy level 0) has a fused
dequantize-and-multiply kernel for one row only; for two rows or more it dequantizes every
weight block again on every call and then runs a float32 GEMM. A decode pass over 16 rows of
the served SmolLM2 build spent 42 of its 58 ms there (2 cores, ORT profile), where a plain
``MatMul`` over the same weights already in float32 skips the dequantization (and the Q4_1
correction nodes: the weights can carry their min term directly). So the engine keeps two
sessions of one model version: the quantized graph for one-row passes, where its fused kernel
wins, and this copy for passes over more rows or prompt tokens (``EngineSettings.float32_rows``).

The same weights: each 4-/8-bit ``MatMulNBits`` (not the LM head, whose weights are
the tied 8-bit table and whose node already quantizes its input per row) becomes a ``MatMul``
with ``d * (q - zero_point)`` in float32, plus the correction ``np.repeat(correction^T, 32)``
that ``model.carry_blocks`` added beside it (``y = x W + blocksum32(x) C^T = x (W + repeat(C^T))``).
A table-lookup node (``colloquy.ai::Q41LutMatMul``, ``model.lut_graph``) becomes a ``MatMul`` with
``d*q + m`` read back from its layout (``model.lut_kernel.dequantize``).
The results differ from the quantized graph's by float rounding only (summation order), so a
greedy near-tie could flip; none did on the 184 quality-gate prompts x 48 tokens (README of
services/generation).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from model import lut_kernel
from model import quant_blocks as qb

# The name of each new float32 weight: its MatMulNBits weight's name + this.
SUFFIX = "/float32"


class Float32CopyError(RuntimeError):
    """The graph has a quantized node this module cannot unpack."""


def float32_copy(model_path: Path, weights_file: Path | None = None) -> tuple[Any, Counter[str]]:
    """The graph at ``model_path`` (an ``onnx.ModelProto``, weights loaded) with every body
    ``MatMulNBits`` a float32 ``MatMul``; and counts of what changed. Raises when there is nothing
    to change (the model is float32 already).

    With ``weights_file`` the new float32 weights are written there, each at a page-aligned
    offset, and the graph refers to them as external data (save it beside that file): they are
    never all in memory at once, and ONNX Runtime can map them.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    vocab = _output_width(graph, "logits")
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    counts: Counter[str] = Counter()
    rename: dict[str, str] = {}
    dead: set[int] = set()
    new_inits: list[Any] = []
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(weights_file, "wb")) if weights_file is not None else None

        def to_matmul(node: Any, weight_t: np.ndarray) -> None:
            """Keep ``weight_t`` [K, N] as a float32 weight and make ``node`` a MatMul reading it."""
            name = node.input[1] + SUFFIX
            new_inits.append(numpy_helper.from_array(weight_t, name) if sink is None
                             else _external(name, weight_t, sink, weights_file.name))
            node.CopyFrom(helper.make_node("MatMul", [node.input[0], name], [node.output[0]],
                                           name=f"{node.name}/float32"))

        for node in graph.node:
            if node.op_type == lut_kernel.OP and node.domain == lut_kernel.DOMAIN:
                w = lut_kernel.dequantize(*(numpy_helper.to_array(inits[name]) for name in node.input[1:4]))
                to_matmul(node, np.ascontiguousarray(w.T))
                counts["matmul_4bit"] += 1
                counts["lut_unpacked"] += 1
                continue
            if node.op_type != "MatMulNBits":
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs["N"] == vocab:
                counts["lm_head_kept"] += 1
                continue
            if len(node.input) > 3 and node.input[3]:
                raise Float32CopyError(f"{node.name}: zero points are not supported")
            try:
                w = qb.unpack_matmul_nbits(numpy_helper.to_array(inits[node.input[1]]),
                                           numpy_helper.to_array(inits[node.input[2]]), attrs["bits"], attrs["K"])
            except ValueError as exc:
                raise Float32CopyError(f"{node.name}: {exc}") from None
            weight_t = np.ascontiguousarray(w.T)  # [K, N]
            add = _correction_add(node, consumers, producers, inits)
            if add is not None:
                correction_node, add_node, correction_t = add
                block = attrs["block_size"]
                weight_t += np.repeat(numpy_helper.to_array(correction_t), block, axis=0)[: attrs["K"]]
                rename[add_node.output[0]] = node.output[0]
                dead.update((id(correction_node), id(add_node)))
                counts["corrections_folded"] += 1
            to_matmul(node, weight_t)
            counts[f"matmul_{attrs['bits']}bit"] += 1
    if not counts["matmul_4bit"] and not counts["matmul_8bit"]:
        raise Float32CopyError(f"{model_path}: no quantized MatMulNBits outside the LM head")
    kept = [n for n in graph.node if id(n) not in dead]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    kept = _live(kept, {o.name for o in graph.output})
    counts["nodes_dropped"] = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in kept for name in node.input}
    keep_inits = [t for t in graph.initializer if t.name in used] + new_inits
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    return model, counts


def _external(name: str, array: np.ndarray, out: Any, location: str) -> Any:
    """A float32 TensorProto whose data is appended to the open file ``out`` (at a 4 KiB boundary)."""
    from onnx import TensorProto

    offset = out.tell()
    pad = -offset % 4096
    out.write(b"\0" * pad)
    out.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape,
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset + pad)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _output_width(graph: Any, name: str) -> int:
    for out in graph.output:
        if out.name == name:
            return int(out.type.tensor_type.shape.dim[-1].dim_value)
    raise Float32CopyError(f"the graph has no {name!r} output")


def _correction_add(node: Any, consumers: dict[str, list[Any]], producers: dict[str, Any],
                    inits: dict[str, Any]) -> tuple[Any, Any, Any] | None:
    """``model.carry_blocks``' ``Add(node's output, MatMul(blocksum, C^T))`` beside ``node``, as
    (correction MatMul, Add, C^T initializer); None when the node has none."""
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    correction = producers.get(other)
    if correction is None or correction.op_type != "MatMul" or correction.input[1] not in inits:
        return None
    if len(consumers.get(other, [])) != 1:
        return None
    return correction, add, inits[correction.input[1]]


def _live(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """``nodes`` without those whose outputs nothing reads (the block sums of folded corrections)."""
    while True:
        read = {name for node in nodes for name in node.input} | outputs
        alive = [n for n in nodes if any(o in read for o in n.output)]
        if len(alive) == len(nodes):
            return alive
        nodes = alive
