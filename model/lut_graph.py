"""A carried build's 4-bit products as one table-lookup node each (``colloquy.ai::Q41LutMatMul``).

``model.carry_blocks`` writes each Q4_1 projection as ``MatMulNBits`` (default zero point 8) plus
a correction ``blocksum32(x) @ (m + 8d)^T``; at float32 activations (accuracy level 0) ONNX
Runtime's kernel converts every 4-bit weight to float before its FMA. The table-lookup op
(``model.lut_kernel``) computes the same ``x @ (d*q + m)^T`` in float32 from the same 4 bits a
weight, min term included, about 1.7x faster per product (``python -m bench.q4_gemv``), and the
correction nodes go with it. This rewrites such a graph in place: the blocks are read back from
the nodes (exactly: ``q``, ``d`` and ``m = correction - 8d``), so the weights stay the GGUF's.
8-bit nodes (the LM head, an RLHF child's trained layers) are left as they are.

The op's shared library is copied into the model directory and named (relative) in
``genai_config.json``'s decoder ``session_options.custom_ops_library``: ONNX Runtime GenAI loads it
from there, and ``services.generation.runner`` registers it from the same entry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from model import lut_kernel

CUSTOM_OPS_KEY = "custom_ops_library"
_Q4 = "weight_Q4G32"


def custom_ops_library(model_dir: Path, genai_config: dict[str, Any] | None = None) -> Path | None:
    """The custom-op library a model directory's decoder needs, or None."""
    doc = genai_config or json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    name = (doc["model"]["decoder"].get("session_options") or {}).get(CUSTOM_OPS_KEY)
    return model_dir / name if name else None


def to_lut(model_dir: Path) -> dict[str, int]:
    """Rewrite ``model_dir`` (a carried build) in place; returns counts for the build log."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_dir / "model.onnx"))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    by_name = {n.name: n for n in graph.node}
    replaced: dict[str, Any] = {}  # MatMulNBits node name -> its Q41LutMatMul node
    gone: set[str] = set()
    new_inits: list[Any] = []
    for node in graph.node:
        if node.op_type != "MatMulNBits" or _Q4 not in node.input[1]:
            continue
        corr_node = by_name.get(f"{node.name}/carry/Correction")
        add_node = by_name.get(f"{node.name}/carry/Add")
        corr_name = node.input[1].replace(_Q4, "carry_correction_T")
        if corr_node is None or add_node is None or corr_name not in inits:
            raise ValueError(f"{node.name}: no Q4_1 correction beside it: not a carried build")
        packed = numpy_helper.to_array(inits[node.input[1]])
        n, kb, _ = packed.shape
        if n % 16:  # the op works in tiles of 16 rows: this product stays as it is
            continue
        q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, kb, 32)
        d = numpy_helper.to_array(inits[node.input[2]]).reshape(n, kb).astype(np.float32)
        m = (numpy_helper.to_array(inits[corr_name]).T - np.float32(8.0) * d).astype(np.float32)
        base = node.input[1].replace(_Q4, "lut")
        for key, array in lut_kernel.lut_layout(q, d, m).items():
            new_inits.append(numpy_helper.from_array(array, f"{base}.{key}"))
        replaced[node.name] = helper.make_node(
            lut_kernel.OP, [node.input[0], f"{base}.W", f"{base}.D", f"{base}.Mn"], [add_node.output[0]],
            name=f"{node.name}/lut", domain=lut_kernel.DOMAIN)
        gone |= {node.name, corr_node.name, add_node.name}
    if not replaced:
        raise ValueError(f"{model_dir}: no 4-bit MatMulNBits to replace")
    kept = []
    for node in graph.node:
        if node.name in replaced:
            kept.append(replaced[node.name])
        elif node.name not in gone:
            kept.append(node)
    read = {name for node in kept for name in node.input}
    blocksums = [n for n in kept if n.name.endswith("/carry/BlockSum") and n.output[0] not in read]
    kept = [n for n in kept if n not in blocksums]
    read = {name for node in kept for name in node.input}
    del graph.node[:]
    graph.node.extend(kept)
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    if not any(o.domain == lut_kernel.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(lut_kernel.DOMAIN, 1))
    (model_dir / "model.onnx.data").unlink(missing_ok=True)
    onnx.save_model(model, str(model_dir / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)

    library = lut_kernel.library_path()
    shutil.copyfile(library, model_dir / library.name)
    config_path = model_dir / "genai_config.json"
    doc = json.loads(config_path.read_text(encoding="utf-8"))
    doc["model"]["decoder"].setdefault("session_options", {})[CUSTOM_OPS_KEY] = library.name
    config_path.write_text(json.dumps(doc, indent=4) + "\n", encoding="utf-8")
    return {"lut_nodes": len(replaced), "blocksums_dropped": len(blocksums)}
