"""Could a hand-written kernel beat ONNX Runtime's 4-bit one at float32 activations? ``python -m bench.q4_gemv``.

Issue 14 wants the served build (the GGUF's Q4_1 blocks, float32 activations: fp32's answers)
at 2.5x float32's decode speed; the served build's ``MatMulNBits`` at accuracy level 0 is most of
a decode step (model/README.md). This times, on one decode step's 150 products of SmolLM2-135M
(30 layers of qkv 960x576, o 576x576, gate and up 1536x576, down 576x1536, batch 1, random Q4_1
blocks, every matrix its own memory, as in the model), in one process and interleaved:

* ONNX Runtime ``MatMulNBits`` at accuracy level 0 (what the served build runs; without the min
  term's correction nodes, so it is ORT's best case) and at level 4 (int8 activations);
* ONNX Runtime float32 ``MatMul`` on the same weights dequantized (the cpu-fp32 build's products);
* ``bench/kernels/q4_1_gemv.c`` (AVX-512, the min term folded in, compiled here with gcc
  ``-O3 -march=native -fopenmp``), checked against numpy first;
* its table-lookup kernel ported to Rust as the ONNX Runtime custom op ``colloquy.ai::Q41LutMatMul``
  (``model/lut_kernel.py``, built with cargo; skipped without it), one node per product, also
  checked against numpy.

Both sides run 2 threads. Prints ms per step and ratios; writes bench/results/q4_gemv.json.
Skipped (said so, exit 0) without gcc or AVX-512.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.common import Record
from model import lut_kernel
from model.lut_kernel import lut_layout

NAME = "q4_gemv"
LAYERS = 30
SHAPES = (("qkv", 960, 576), ("o", 576, 576), ("gate", 1536, 576), ("up", 1536, 576), ("down", 576, 1536))
SOURCE = Path(__file__).resolve().parent / "kernels" / "q4_1_gemv.c"
THREADS = 2


def matrices(seed: int = 0) -> list[dict[str, Any]]:
    """Random Q4_1 blocks in both byte orders (the GGUF's, and MatMulNBits' 2i/2i+1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(LAYERS):
        for name, n, k in SHAPES:
            q = rng.integers(0, 16, size=(n, k // 32, 32), dtype=np.uint8)
            d = (rng.random((n, k // 32), dtype=np.float32) * 0.02).astype(np.float32)
            m = (-rng.random((n, k // 32), dtype=np.float32) * 0.1).astype(np.float32)
            out.append({"name": name, "N": n, "K": k, "q": q, "d": d, "m": m,
                        "gguf": np.ascontiguousarray(q[:, :, :16] | (q[:, :, 16:] << 4)),
                        "nbits": np.ascontiguousarray(q[:, :, 0::2] | (q[:, :, 1::2] << 4))})
    return out


def dequantized(mat: dict[str, Any]) -> np.ndarray:
    return (mat["d"][:, :, None] * mat["q"] + mat["m"][:, :, None]).reshape(mat["N"], mat["K"])


def ort_session(mats: list[dict[str, Any]], kind: str, level: int, tmp: Path) -> Any:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for i, mat in enumerate(mats):
        x = f"x{mat['K']}"
        if kind == "lut":
            lut = mat["lut"]
            inits += [numpy_helper.from_array(lut[name], f"{name}{i}") for name in ("W", "D", "Mn")]
            nodes.append(helper.make_node(lut_kernel.OP, [x, f"W{i}", f"D{i}", f"Mn{i}"], [f"y{i}"],
                                          domain=lut_kernel.DOMAIN))
        elif kind == "nbits":
            inits += [numpy_helper.from_array(mat["nbits"], f"B{i}"), numpy_helper.from_array(mat["d"], f"S{i}")]
            nodes.append(helper.make_node("MatMulNBits", [x, f"B{i}", f"S{i}"], [f"y{i}"], domain="com.microsoft",
                                          K=mat["K"], N=mat["N"], bits=4, block_size=32, accuracy_level=level))
        else:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(dequantized(mat).T), f"W{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in (576, 1536)]
    model = helper.make_model(helper.make_graph(nodes, kind, inputs, outs, inits), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
                              + ([helper.make_opsetid(lut_kernel.DOMAIN, 1)] if kind == "lut" else []))
    path = tmp / f"{kind}{level}.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    so = lut_kernel.session_options(threads=THREADS) if kind == "lut" else ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def compile_kernel(tmp: Path) -> ctypes.CDLL:
    lib = tmp / "libq4_1_gemv.so"
    subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", str(lib)],
                   check=True)
    return ctypes.CDLL(str(lib))


def hand_kernel(lib: ctypes.CDLL, mats: list[dict[str, Any]], xs: dict[int, np.ndarray],
                lut: bool) -> tuple[Any, list[np.ndarray]]:
    """A no-argument call running every product, and the output arrays it fills."""
    p = ctypes.c_void_p
    n = len(mats)
    ys = [np.empty(m["N"], np.float32) for m in mats]

    def ptrs(arrays: list[np.ndarray]) -> Any:
        return (p * n)(*[a.ctypes.data_as(p) for a in arrays])

    src = ([{"w": m["lut"]["W"], "d": m["lut"]["D"], "m": m["lut"]["Mn"]} for m in mats] if lut
           else [{"w": m["gguf"], "d": m["d"], "m": m["m"]} for m in mats])
    args = (ptrs([s["w"] for s in src]), ptrs([s["d"] for s in src]), ptrs([s["m"] for s in src]),
            ptrs([xs[m["K"]] for m in mats]), ptrs(ys), (ctypes.c_int * n)(*[m["N"] for m in mats]),
            (ctypes.c_int * n)(*[m["K"] for m in mats]), n, THREADS)
    fn = lib.q4_1_lut_many if lut else lib.q4_1_gemv_many
    return (lambda: fn(*args)), ys


def relative_error(mats: list[dict[str, Any]], xs: dict[int, np.ndarray], ys: list[np.ndarray]) -> float:
    """Worst max-abs error over max-abs result, against numpy float64, on the first layer's products."""
    errs = []
    for mat, y in zip(mats[:len(SHAPES)], ys, strict=False):
        ref = dequantized(mat).astype(np.float64) @ xs[mat["K"]]
        errs.append(float(np.max(np.abs(np.ravel(y) - ref)) / np.max(np.abs(ref))))
    return max(errs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").is_file() else ""
    rec = Record(NAME, {"layers": LAYERS, "shapes": SHAPES, "threads": THREADS, "rounds": args.rounds,
                        "calls_per_round": args.calls, "method": __doc__.split("\n\n")[1].replace("\n", " ")})
    if shutil.which("gcc") is None or " avx512f" not in flags:
        rec.skip("hand kernel", "needs gcc and an AVX-512 CPU")
        rec.finish()
        return rec.doc
    mats = matrices()
    rng = np.random.default_rng(1)
    xs = {k: rng.standard_normal(k).astype(np.float32) for k in (576, 1536)}
    feeds = {f"x{k}": v[None] for k, v in xs.items()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lib = compile_kernel(tmp)
        for mat in mats:
            mat["lut"] = lut_layout(mat["q"], mat["d"], mat["m"])
        hands = {"hand kernel, AVX-512 float32 activations": hand_kernel(lib, mats, xs, lut=False),
                 "hand kernel, table lookup, float32 activations": hand_kernel(lib, mats, xs, lut=True)}
        errors = {}
        for name, (call, ys) in hands.items():
            call()
            errors[name] = err = relative_error(mats, xs, ys)
            if err > 1e-5:
                raise SystemExit(f"{name} is wrong: relative error {err:.2e}")
        sessions = {"ort MatMulNBits level 0 (served)": ort_session(mats, "nbits", 0, tmp),
                    "ort MatMulNBits level 4 (int8 activations)": ort_session(mats, "nbits", 4, tmp),
                    "ort float32 MatMul (cpu-fp32)": ort_session(mats, "fp32", 0, tmp)}
        custom = "ort custom op Q41LutMatMul (colloquy.ai)"
        try:
            sessions[custom] = ort_session(mats, "lut", 0, tmp)
        except (FileNotFoundError, RuntimeError) as e:  # no cargo, or its build failed
            rec.skip(custom, str(e).splitlines()[0])
        else:
            errors[custom] = err = relative_error(mats, xs, sessions[custom].run(None, feeds))
            if err > 1e-5:
                raise SystemExit(f"{custom} is wrong: relative error {err:.2e}")
        contenders = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
        contenders.update({name: call for name, (call, _) in hands.items()})
        ms: dict[str, list[float]] = {name: [] for name in contenders}
        for rnd in range(args.rounds + 1):
            for name, call in contenders.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    call()
                if rnd:  # round 0 warms up
                    ms[name].append((time.perf_counter() - t0) * 1000 / args.calls)
    served = statistics.median(ms["ort MatMulNBits level 0 (served)"])
    fp32 = statistics.median(ms["ort float32 MatMul (cpu-fp32)"])
    rows = []
    for name, samples in ms.items():
        med = statistics.median(samples)
        rec.results[name] = {"ms_per_step": common.summary(samples, 3), "x_served": round(served / med, 2),
                             "x_fp32": round(fp32 / med, 2)}
        rows.append([name, f"{med:.2f}", f"{min(samples):.2f}", f"{served / med:.2f}", f"{fp32 / med:.2f}"])
    rec.results["max_relative_error"] = errors
    rec.finish()
    print(common.table(rows, ["products of one decode step (150)", "ms median", "ms best", "x served kernel",
                              "x float32"]))
    return rec.doc


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.q4_gemv", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (contenders interleaved in each)")
    p.add_argument("--calls", type=int, default=50, help="decode steps per contender per round")
    run(p.parse_args())


if __name__ == "__main__":
    main()
