"""Put exact 4-/8-bit blocks into the builder's int4 graph: the served CPU build.

The ONNX Runtime GenAI builder still makes the graph (GroupQueryAttention, fused qkv, KV cache
I/O, the pruned LM head, ``genai_config.json``); this module only swaps the weights of its
``MatMulNBits`` nodes for blocks that reproduce the source weights (``model.quant_blocks``) and adds
the Q4_1 correction next to each 4-bit node:

    y = MatMulNBits(x) + MatMul(blocksum32(x), correction^T)

``blocksum32(x)`` (x summed over each block of 32 input features) is one ``MatMul`` with a constant
0/1 matrix, computed once per input tensor and shared by the nodes that read it (q/k/v are one
fused node already; gate and up share theirs, or with ``fuse_gate_up`` become one node and one
correction followed by a ``Split``). The LM head and the embedding read one Q8_0 table.

Two sources of blocks: the GGUF's own (:func:`gguf_weights`, the served build: no second
rounding) or float32 weights quantized the way llama.cpp would (:func:`fp32_weights`, an RLHF
child's export).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from model import quant_blocks as qb

# The builder's names: "model.layers.{i}.{attn|mlp}.{proj}.MatMul.weight_Q4G32" / "lm_head...Q8G32".
_NODE_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.MatMul\.weight_Q([48])G32$")
LM_HEAD_WEIGHT = "lm_head.MatMul.weight_Q8G32"
LM_HEAD_SCALE = "lm_head.MatMul.weight_scale"
PROJECTIONS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_GATE_UP = "gate_up_proj"  # a layer's gate rows then up rows in one node (fuse_gate_up)

# A weight source: (layer, projection) -> 4-bit blocks of the [N, K] weight; None -> the tied
# embedding / LM head's 8-bit blocks.
BlockSource = Callable[[int | None, str], "qb.Q4Blocks | qb.Q8Blocks"]


class CarryError(RuntimeError):
    """The builder's graph does not have the shape this carrier expects."""


def gguf_weights(gguf_path: Path, n_head: int, n_kv_head: int) -> BlockSource:
    """Blocks read from the GGUF (Q4_1 body, Q8_0 embedding = tied LM head), rows unpermuted."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}

    def q4(name: str) -> qb.Q4Blocks:
        t = tensors[name]
        if t.tensor_type.name != "Q4_1":
            raise CarryError(f"{name} is {t.tensor_type.name}, expected Q4_1")
        return qb.parse_q4_1(np.asarray(t.data))

    def source(layer: int | None, proj: str) -> qb.Q4Blocks | qb.Q8Blocks:
        if layer is None:
            t = tensors["token_embd.weight"]
            if t.tensor_type.name != "Q8_0":
                raise CarryError(f"token_embd.weight is {t.tensor_type.name}, expected Q8_0")
            return qb.parse_q8_0(np.asarray(t.data))
        blk = f"blk.{layer}."
        if proj == "qkv_proj":
            q = q4(blk + "attn_q.weight")
            k = q4(blk + "attn_k.weight")
            return qb.concat([q.rows(qb.unpermute_rows(q.q.shape[0], n_head)),
                              k.rows(qb.unpermute_rows(k.q.shape[0], n_kv_head)),
                              q4(blk + "attn_v.weight")])
        gguf_name = {"o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                     "down_proj": "ffn_down"}[proj]
        return q4(blk + gguf_name + ".weight")

    return source


def fp32_weights(state: Mapping[str, np.ndarray],
                 eight_bit_layers: frozenset[int] = frozenset()) -> BlockSource:
    """Blocks made from a float32 Hugging Face state dict (Q4_1 body, Q8_0 tied embedding).

    Layers in ``eight_bit_layers`` get Q8_0 projections: an RLHF child's trained layers, whose
    small update a Q4_1 step (about 1/15 of a block's range) would mostly round back onto the
    parent's blocks (measured: 21 of 24 greedy answers of a round's child changed in float32,
    6 after a Q4_1 export).
    """

    def source(layer: int | None, proj: str) -> qb.Q4Blocks | qb.Q8Blocks:
        if layer is None:
            return qb.quantize_q8_0(state["model.embed_tokens.weight"])
        p = f"model.layers.{layer}."
        if proj == "qkv_proj":
            w = np.concatenate([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        elif proj == "o_proj":
            w = state[p + "self_attn.o_proj.weight"]
        else:
            w = state[p + f"mlp.{proj}.weight"]
        return qb.quantize_q8_0(w) if layer in eight_bit_layers else qb.quantize_q4_1(w)

    return source


def carry(src_dir: Path, out_dir: Path, weights: BlockSource, *,
          accuracy_level: int | Callable[[int, str], int] = 4, exact_top_k: int = 0,
          fuse_gate_up: bool = False) -> dict[str, int]:
    """Write ``out_dir``: ``src_dir`` (a builder int4 build) with its weights from ``weights``.

    ``accuracy_level`` is the 4-bit nodes' (one value, or one per ``(layer, projection)``;
    4: activations quantized to int8 per block, fastest; 0: float32 activations). The LM head
    stays at 4 (at 0 ONNX Runtime dequantizes its 28M weights on every call); ``exact_top_k``
    > 0 recomputes its best ``k`` logits from the float32 activations and the exact table
    (:func:`_rescore_top_k`), so the tokens that greedy decoding and low-temperature sampling
    choose from are scored as float32 would. ``fuse_gate_up`` puts each layer's gate and up rows
    into one node (one kernel call and one correction instead of two each, then a ``Split``;
    the same blocks, so the same weights). Returns counts for the build log.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src_dir / "model.onnx"))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[tuple[int, list[onnx.NodeProto]]] = []  # (insert after index, nodes)
    blocksums: dict[str, str] = {}
    consumers_rename: dict[str, str] = {}
    counts = {"nodes_4bit": 0, "blocksums": 0, "tables_8bit": 0}
    up_nodes = _up_partners(graph) if fuse_gate_up else {}
    fused_up_names = {n.name for n in up_nodes.values()}
    drop: list[onnx.NodeProto] = []

    def level_of(layer: int, proj: str) -> int:
        return accuracy_level if isinstance(accuracy_level, int) else accuracy_level(layer, proj)

    def put(name: str, array: np.ndarray) -> None:
        if name in inits:
            old = inits[name]
            if tuple(old.dims) != array.shape:
                raise CarryError(f"{name}: builder has {tuple(old.dims)}, blocks give {array.shape}")
            graph.initializer.remove(old)
        tensor = numpy_helper.from_array(array, name)
        new_inits.append(tensor)
        inits[name] = tensor

    for index, node in enumerate(list(graph.node)):
        if node.op_type != "MatMulNBits":
            continue
        weight = node.input[1]
        if weight == LM_HEAD_WEIGHT:
            table = weights(None, "lm_head")
            if not isinstance(table, qb.Q8Blocks):
                raise CarryError("the LM head's blocks must be 8-bit")
            packed, scales = qb.pack_matmul_nbits_8(table)
            put(LM_HEAD_WEIGHT, packed)
            put(LM_HEAD_SCALE, scales)
            counts["tables_8bit"] += 1
            continue
        match = _NODE_WEIGHT.match(weight)
        if not match or match.group(3) not in PROJECTIONS:
            raise CarryError(f"unexpected MatMulNBits weight {weight!r}: the graph must come from the "
                             "builder's int4 with algo_config=rtn_last (block 32)")
        if len(node.input) > 3 and node.input[3]:
            raise CarryError(f"{node.name} has zero points; expected a symmetric builder build")
        layer, proj = int(match.group(1)), match.group(3)
        if node.name in fused_up_names:
            continue  # an up_proj fused into its gate_proj
        blocks = weights(layer, proj)
        level = level_of(layer, proj)
        if isinstance(blocks, qb.Q8Blocks):  # symmetric 8-bit: the kernel's own zero point, no correction
            if node.name in up_nodes:
                raise CarryError(f"layer {layer}: 8-bit gate and up cannot be fused")
            packed8, scales8 = qb.pack_matmul_nbits_8(blocks)
            graph.initializer.remove(inits.pop(weight))
            node.input[1] = weight.replace("weight_Q4G32", "weight_Q8G32")
            put(node.input[1], packed8)
            put(node.input[2], scales8)
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
                elif attr.name == "bits":
                    attr.i = 8
            counts["nodes_8bit"] = counts.get("nodes_8bit", 0) + 1
            continue
        if not isinstance(blocks, qb.Q4Blocks):
            raise CarryError(f"layer {layer} {proj}: expected 4-bit or 8-bit blocks")
        split_outputs: list[str] = []
        up = up_nodes.get(node.name)
        if up is not None:
            up_blocks = weights(layer, "up_proj")
            if not isinstance(up_blocks, qb.Q4Blocks):
                raise CarryError(f"layer {layer} up_proj: expected 4-bit blocks")
            if level_of(layer, "up_proj") != level:
                raise CarryError(f"layer {layer}: gate and up need one accuracy level to be fused")
            split_outputs = [node.output[0], up.output[0]]
            sizes = [blocks.q.shape[0], up_blocks.q.shape[0]]
            blocks = qb.concat([blocks, up_blocks])
            for name in (up.input[1], up.input[2]):
                graph.initializer.remove(inits.pop(name))
            drop.append(up)
            old_weight, old_scale = weight, node.input[2]
            weight = old_weight.replace(".gate_proj.", f".{FUSED_GATE_UP}.")
            node.input[1], node.input[2] = weight, old_scale.replace(".gate_proj.", f".{FUSED_GATE_UP}.")
            for name in (old_weight, old_scale):
                graph.initializer.remove(inits.pop(name))
            node.name = node.name.replace("/gate_proj/", f"/{FUSED_GATE_UP}/")
            node.output[0] = f"{node.name}/output_0"
        packed, scales, correction = qb.pack_matmul_nbits_4(blocks)
        put(weight, packed)
        put(node.input[2], scales)
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = level
            elif attr.name == "N":
                attr.i = packed.shape[0]
        counts["nodes_4bit"] += 1

        x = node.input[0]
        k = packed.shape[1] * qb.BLOCK
        added: list[onnx.NodeProto] = []
        if x not in blocksums:
            ones = np.kron(np.eye(k // qb.BLOCK, dtype=np.float32),
                           np.ones((qb.BLOCK, 1), dtype=np.float32))  # [K, K/32]
            ones_name = f"carry.blocksum_matrix.K{k}"
            if ones_name not in inits:
                put(ones_name, ones)
            blocksums[x] = f"{node.name}/carry/blocksum"
            added.append(helper.make_node("MatMul", [x, ones_name], [blocksums[x]],
                                          name=f"{node.name}/carry/BlockSum"))
            counts["blocksums"] += 1
        corr_name = weight.replace("weight_Q4G32", "carry_correction_T")
        put(corr_name, np.ascontiguousarray(correction.T))  # [K/32, N]
        raw_out = node.output[0]
        fixed = f"{raw_out}/carried"
        corr_out = f"{node.name}/carry/correction"
        added += [
            helper.make_node("MatMul", [blocksums[x], corr_name], [corr_out],
                             name=f"{node.name}/carry/Correction"),
            helper.make_node("Add", [raw_out, corr_out], [fixed], name=f"{node.name}/carry/Add"),
        ]
        if split_outputs:  # the fused node: gate's and up's corrected outputs come from a Split
            sizes_name = f"carry.split.{sizes[0]}_{sizes[1]}"
            if sizes_name not in inits:
                put(sizes_name, np.array(sizes, dtype=np.int64))
            outs = [f"{name}/carried" for name in split_outputs]
            added.append(helper.make_node("Split", [fixed, sizes_name], outs, axis=-1,
                                          name=f"{node.name}/carry/Split"))
            consumers_rename.update(zip(split_outputs, outs, strict=True))
            counts["fused_gate_up"] = counts.get("fused_gate_up", 0) + 1
        else:
            consumers_rename[raw_out] = fixed
        new_nodes.append((index, added))

    if counts["nodes_4bit"] == 0 or counts["tables_8bit"] != 1:
        raise CarryError(f"unexpected graph: {counts}")
    for node in graph.node:  # consumers read the corrected output
        for i, name in enumerate(node.input):
            if name in consumers_rename:
                node.input[i] = consumers_rename[name]
    for out in graph.output:
        if out.name in consumers_rename:
            raise CarryError(f"graph output {out.name} would need a correction")
    for index, added in reversed(new_nodes):  # keep topological order: right after the producer
        for offset, n in enumerate(added):
            graph.node.insert(index + 1 + offset, n)
    for up in drop:  # after the inserts, which count positions in the original graph
        graph.node.remove(up)
    graph.initializer.extend(new_inits)
    if exact_top_k:
        _rescore_top_k(graph, exact_top_k)
        counts["exact_top_k"] = exact_top_k

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():
        if f.is_file() and f.name not in {"model.onnx", "model.onnx.data", ".stamp.json"}:
            shutil.copyfile(f, out_dir / f.name)
    onnx.save_model(model, str(out_dir / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    return counts


def _up_partners(graph: object) -> dict[str, object]:
    """gate_proj node name -> the up_proj node of its layer, which reads the same input."""
    by_layer: dict[int, dict[str, object]] = {}
    for node in graph.node:
        match = _NODE_WEIGHT.match(node.input[1]) if node.op_type == "MatMulNBits" else None
        if match and match.group(3) in ("gate_proj", "up_proj"):
            by_layer.setdefault(int(match.group(1)), {})[match.group(3)] = node
    pairs = {}
    for layer, nodes in sorted(by_layer.items()):
        gate, up = nodes.get("gate_proj"), nodes.get("up_proj")
        if gate is None or up is None or gate.input[0] != up.input[0]:
            raise CarryError(f"layer {layer}: gate_proj and up_proj do not read one input")
        pairs[gate.name] = up
    return pairs


def _rescore_top_k(graph: object, k: int) -> None:
    """Replace the LM head's ``k`` highest logits by float32 dot products with the exact table.

    At accuracy level 4 the head quantizes its input to int8 (logits off by up to ~0.3, enough to
    flip near-ties); a full float32 head costs more than the rest of a decode step. Only the
    leaders matter for greedy and nucleus sampling, so: TopK, gather their rows of the Q8_0 table
    (the embedding's own ``GatherBlockQuantized`` read), dot with the head's input, scatter back.
    """
    from onnx import helper, numpy_helper

    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == LM_HEAD_WEIGHT)
    embed = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    if head.output[0] != "logits":
        raise CarryError(f"the LM head writes {head.output[0]!r}, expected 'logits'")
    approx = "logits/approx"
    head.output[0] = approx
    graph.initializer.extend([numpy_helper.from_array(np.array([k], dtype=np.int64), "carry.top_k"),
                              numpy_helper.from_array(np.array([2], dtype=np.int64), "carry.axis2"),
                              numpy_helper.from_array(np.array([-1], dtype=np.int64),
                                                      "carry.axis_last")])
    attrs = {a.name: helper.get_attribute_value(a) for a in embed.attribute}
    p = "/lm_head/carry/"
    graph.node.extend([
        helper.make_node("TopK", [approx, "carry.top_k"], [p + "values", p + "indices"],
                         name=p + "TopK", axis=-1),
        helper.make_node("GatherBlockQuantized", [embed.input[0], p + "indices", embed.input[2]],
                         [p + "rows"], name=p + "GatherRows", domain="com.microsoft", **attrs),
        helper.make_node("Unsqueeze", [head.input[0], "carry.axis2"], [p + "hidden"],
                         name=p + "Unsqueeze"),
        helper.make_node("Mul", [p + "rows", p + "hidden"], [p + "products"], name=p + "Mul"),
        helper.make_node("ReduceSum", [p + "products", "carry.axis_last"], [p + "exact"],
                         name=p + "ReduceSum", keepdims=0),
        helper.make_node("ScatterElements", [approx, p + "indices", p + "exact"], ["logits"],
                         name=p + "Scatter", axis=-1),
    ])


def carried_weights(model_dir: Path) -> dict[tuple[int | None, str], np.ndarray]:
    """The float32 [N, K] weights a carried build computes with, read back from its files
    (``MatMulNBits`` with its correction, or a table-lookup node of ``model.lut_graph``).

    For tests and the build's own check: ``(layer, proj)`` -> weight, ``(None, "lm_head")`` -> the
    tied table.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_dir / "model.onnx"))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out: dict[tuple[int | None, str], np.ndarray] = {
        (None, "lm_head"): qb.unpack_matmul_nbits_8(arrays[LM_HEAD_WEIGHT], arrays[LM_HEAD_SCALE])}
    for name, packed in arrays.items():
        match = _NODE_WEIGHT.match(name)
        if match and match.group(4) == "8":
            out[(int(match.group(1)), match.group(3))] = qb.unpack_matmul_nbits_8(
                packed, arrays[name.replace("weight_Q8G32", "weight_scale")])
        elif match:
            scales = arrays[name.replace("weight_Q4G32", "weight_scale")]
            corr = arrays[name.replace("weight_Q4G32", "carry_correction_T")].T
            weight = qb.unpack_matmul_nbits_4(packed, scales, corr)
            layer, proj = int(match.group(1)), match.group(3)
            if proj == FUSED_GATE_UP:  # gate rows, then up rows (the Split's sizes)
                split = next(int(numpy_helper.to_array(t)[0]) for t in model.graph.initializer
                             if t.name.startswith("carry.split."))
                out[(layer, "gate_proj")], out[(layer, "up_proj")] = weight[:split], weight[split:]
            else:
                out[(layer, proj)] = weight
        elif name.endswith(".lut.W"):  # a table-lookup node of model.lut_graph
            from model.lut_kernel import dequantize

            match = _NODE_WEIGHT.match(name[: -len("lut.W")] + "weight_Q4G32")
            if match:
                base = name[: -len(".W")]
                out[(int(match.group(1)), match.group(3))] = dequantize(packed, arrays[base + ".D"],
                                                                        arrays[base + ".Mn"])
    return out
