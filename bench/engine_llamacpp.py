"""llama.cpp's server as the engine benchmark's CPU contender that batches.

``llama-server`` (slots, continuous batching on by default) is what a CPU deployment of this model
would run instead of Colloquy, so it is the anchor of issue 15's aggregate goals; llama-cpp-python
generates one sequence at a time and cannot be one. The binary is built by
bench/build_llama_server.sh (bench/install.sh calls it; cached in ~/.cache/colloquy/llama.cpp) and
started here on the GGUF the served model came from, ``-np 16 -c 16384 -t 2`` (16 slots of 1024
tokens). Requests go over HTTP ``/completion`` with the prompt as token ids (the same ids the other
contenders get), greedy, ``ignore_eos`` (exactly max_tokens, like the in-process contenders),
``cache_prompt`` off (the other contenders run with the prefix cache off), streamed so that each
token is stamped on arrival.

``python -m bench.engine_llamacpp [REPEATS]`` runs only llama.cpp's server against ORT GenAI
direct (batch 1 and a static batch of 16), taking turns, and writes bench/results/engine_llamacpp.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import common
from devtools import procs

SLOTS = 16
CONTEXT = 16384  # 1024 tokens per slot
BUILD_SCRIPT = common.ROOT / "bench" / "build_llama_server.sh"


def server_path() -> Path | None:
    """The built llama-server, or None (the build script says where it keeps it, building nothing)."""
    if os.environ.get("COLLOQUY_LLAMA_SERVER"):
        return Path(os.environ["COLLOQUY_LLAMA_SERVER"])
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--path"], capture_output=True, text=True, check=False)
    path = Path(out.stdout.strip()) if out.stdout.strip() else None
    return path if out.returncode == 0 and path and path.is_file() else None


class LlamaServer:
    """One llama-server process on a free port; ``single``/``batch`` match the other contenders'."""

    name = "llama.cpp-server"

    def __init__(self, binary: Path, gguf: Path, threads: int = 2, slots: int = SLOTS, ctx: int = CONTEXT) -> None:
        from devtools.procs import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.gettempdir()) / f"colloquy-bench-llama-server-{self.port}.log"
        self.args = [str(binary), "-m", str(gguf), "-np", str(slots), "-c", str(ctx), "-t", str(threads),
                     "--host", "127.0.0.1", "--port", str(self.port)]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = f"{binary.parent}:{env.get('LD_LIBRARY_PATH', '')}"  # shared builds
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, env=env)
        self._wait_healthy(120.0)

    def _wait_healthy(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-600:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        self.close()
        raise TimeoutError(f"llama-server not healthy in {timeout:.0f} s ({self.log})")

    def close(self) -> None:
        procs.terminate(self.proc, 15)

    async def _one(self, session: Any, ids: list[int], tokens: int) -> dict[str, Any]:
        body = {"prompt": ids, "n_predict": tokens, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0,
                "ignore_eos": True, "cache_prompt": False, "stream": True, "return_tokens": True}
        start = time.perf_counter()
        stamps: list[float] = []
        counts: list[int] = []
        async with session.post(f"{self.url}/completion", json=body) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                n = len(event.get("tokens") or []) or (1 if event.get("content") else 0)
                if n and not event.get("stop"):
                    stamps.append(time.perf_counter())
                    counts.append(n)
                if event.get("stop"):
                    # The last event may carry the last token, or only the timings.
                    extra = int(event.get("tokens_predicted") or 0) - sum(counts)
                    if extra > 0:
                        stamps.append(time.perf_counter())
                        counts.append(extra)
                    break
        return {"start": start, "stamps": stamps, "counts": counts}

    async def _many(self, prompts: list[list[int]], tokens: int) -> list[dict[str, Any]]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            return await asyncio.gather(*(self._one(session, ids, tokens) for ids in prompts))

    def single(self, ids: list[int], tokens: int) -> dict[str, Any]:
        from bench.engine import _stamps_result

        r = asyncio.run(self._many([ids], tokens))[0]
        return _stamps_result(len(ids), r["start"], r["stamps"], r["counts"])

    def batch(self, prompts: list[list[int]], tokens: int, streams: int) -> dict[str, Any]:
        """``streams`` concurrent requests over ``prompts`` in turn: tokens and each stream's ITL."""
        from bench.engine import produced

        runs = asyncio.run(self._many([prompts[i % len(prompts)] for i in range(streams)], tokens))
        return produced(runs)


@contextlib.contextmanager
def running(threads: int = 2) -> Iterator[LlamaServer]:
    """A llama-server for the benchmark's lifetime (it idles at no CPU between requests)."""
    binary = server_path()
    if binary is None:
        raise FileNotFoundError(f"llama-server is not built: run `bash {BUILD_SCRIPT.relative_to(common.ROOT)}` "
                                "(bench/install.sh does, ~5 minutes on 2 cores)")
    server = LlamaServer(binary, common.gguf_path(), threads=threads)
    try:
        yield server
    finally:
        server.close()


def main() -> None:
    """llama.cpp's server and ORT GenAI direct only, taking turns: 1 and 16 streams."""
    from bench import engine

    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    tokens = 96
    model_dir, version = common.served_model()
    ort = engine.OrtGenai(str(model_dir))
    ids = [ort.encode(common.chat_prompt(q)) for q in common.QUESTIONS]
    out: dict[str, Any] = {"benchmark": "engine-llamacpp", "model_version": version, "gguf": str(common.gguf_path()),
                           "max_tokens": tokens, "repeats": repeats, "prompts": common.QUESTIONS,
                           "loadavg_before": common.loadavg()}
    with common.stack_lock(), running() as srv:
        out["server_args"] = srv.args[1:]
        out["results"] = engine.measure_interleaved(
            {"ort-genai": (lambda i: ort.single(ids[i], tokens), lambda n: ort.batch(ids[0], tokens, n)),
             srv.name: (lambda i: srv.single(ids[i], tokens), lambda n: srv.batch(ids, tokens, n))},
            len(ids), [1, SLOTS], repeats, repeats)
    out["loadavg_after"] = common.loadavg()
    path = common.RESULTS / "engine_llamacpp.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    for name, r in out["results"].items():
        print(f"{name:18s} decode b1 {r['single']['decode_tok_s']['median']} tok/s  "
              f"agg@1 {r['streams']['1']['median']}  agg@16 {r['streams'][str(SLOTS)]['median']} tok/s  "
              f"ITL@16 p50/p99 {r['streams_itl_ms'][str(SLOTS)]['median']}/{r['streams_itl_ms'][str(SLOTS)]['p99']} ms")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
