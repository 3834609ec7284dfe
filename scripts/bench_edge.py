"""Decode tokens/s of the 169M-shaped model on the edge runtimes, next to the Python runtime, in one run.

    python scripts/bench_edge.py [--tokens 64] [--gpu-tokens 8] [--threads 2] [--work build/bench-edge]

Makes the random-weights RWKV-4 169M checkpoint (scripts/make_169m.py), exports its step graph
(--tokenizer none, fp32), then measures greedy decode (batch 1, logits to the CPU each step) with:
the Python runtime (onnxruntime CPU), Node (onnxruntime-node), headless chromium on WASM (1 and N
threads, cross-origin isolated) and on WebGPU (SwiftShader: a CPU rasteriser, not a GPU). Prints a
Markdown table and the machine (lscpu). Needs js/node_modules (scripts/ci_edge_setup.sh) and chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def python_decode(model: Path, tokens: int, threads: int) -> dict:
    from rwkv_runtime import Session

    s = Session(model, threads=threads)
    st = s.new_state(1)
    tok = 0
    for _ in range(4):
        _, st = s.step(np.array([tok]), st)
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits, st = s.step(np.array([tok]), st)
        tok = int(np.argmax(logits[0]))
    sec = time.perf_counter() - t0
    return {
        "runtime": "python (rwkv_runtime, onnxruntime CPU)",
        "tokens": tokens,
        "seconds": sec,
        "tokens_per_s": tokens / sec,
        "threads": threads,
    }


def bandwidth_ceiling(model: Path, repeats: int = 3) -> dict:
    """Decode reads every weight once per token: 1 / (time to read the model's bytes from RAM) bounds
    tokens/s for batch 1 on this machine (best of a few passes over an in-memory copy)."""
    a = np.fromfile(model, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with np.errstate(all="ignore"):  # the bytes include the protobuf framing: values are irrelevant
            a.sum(dtype=np.float32)  # one streaming pass over every byte
        best = min(best, time.perf_counter() - t0)
    return {
        "runtime": "ceiling: one read of the weights (numpy sum, 1 thread)",
        "tokens": 1,
        "seconds": best,
        "tokens_per_s": 1 / best,
        "threads": 1,
        "gb_per_s": a.nbytes / best / 1e9,
    }


def browser(site: Path, jobs: list) -> list:
    server = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "deploy_examples" / "web" / "serve.py"),
            "--port",
            "0",
            "--dir",
            str(site),
            "--max-seconds",
            "1800",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = server.stdout.readline().split(" at ")[1].strip()
        cfg = site.parent / "browser-jobs.json"
        cfg.write_text(
            json.dumps(
                {
                    "chromium": "/usr/bin/chromium",
                    "jobs": [
                        {**j, "url": url + j["url"], "wait": "window.benchResult", "timeoutMs": 900_000} for j in jobs
                    ],
                }
            )
        )
        p = subprocess.run(
            ["node", "browser/run.mjs", str(cfg)], cwd=REPO / "js", capture_output=True, text=True, timeout=2400
        )
        if p.returncode:
            raise SystemExit(f"Error: browser run failed: {p.stderr[-500:]}")
        return [r.get("result") or {"error": r.get("error")} for r in json.loads(p.stdout.strip().splitlines()[-1])]
    finally:
        server.terminate()
        server.wait(timeout=10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--gpu-tokens", type=int, default=8, help="WebGPU on SwiftShader is slow: fewer steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=REPO / "build" / "bench-edge")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt, model = a.work / "rwkv4-169m-random.pth", a.work / "rwkv4-169m.onnx"
    if not ckpt.is_file():
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make_169m.py"), "--version", "4", "-o", str(ckpt)], check=True
        )
    if not model.is_file():
        subprocess.run(
            [
                str(Path(sys.executable).parent / "rwkv-export"),
                "export",
                str(ckpt),
                "-o",
                str(model),
                "--graphs",
                "step",
                "--tokenizer",
                "none",
                "-q",
            ],
            check=True,
        )
    rows = [bandwidth_ceiling(model), python_decode(model, a.tokens, a.threads)]
    node = subprocess.run(
        ["node", "bench/node-bench.mjs", str(model), str(a.tokens), str(a.threads)],
        cwd=REPO / "js",
        capture_output=True,
        text=True,
        timeout=1200,
    )
    rows.append(
        json.loads(node.stdout.strip().splitlines()[-1])
        if node.returncode == 0
        else {"runtime": "node", "error": node.stderr[-300:]}
    )
    site = a.work / "site"
    site.mkdir(exist_ok=True)
    links = {
        "rwkv-runtime": REPO / "js" / "src",
        "ort": REPO / "js" / "node_modules" / "onnxruntime-web" / "dist",
        "bench.html": REPO / "js" / "bench" / "bench.html",
        "bench-page.js": REPO / "js" / "bench" / "bench-page.js",
        model.name: model,
    }
    for name, target in links.items():
        if not (site / name).exists():
            os.symlink(target, site / name)
    q = f"bench.html?model=./{model.name}"
    rows += browser(
        site,
        [
            {"url": f"{q}&backend=wasm&threads=1&tokens={a.tokens}"},
            {"url": f"{q}&backend=wasm&threads={a.threads}&tokens={a.tokens}"},
            {"url": f"{q}&backend=webgpu&tokens={a.gpu_tokens}", "webgpu": True},
        ],
    )
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    print(
        "machine:",
        "; ".join(
            ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith(("Model name", "CPU(s):", "Architecture"))
        ),
        f"; load average at the end: {os.getloadavg()[0]:.1f}",
    )
    print("\n| runtime | threads | decode tokens/s | steps timed |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r.get('runtime', '?')} | | error: {str(r['error'])[:80]} | |")
        else:
            print(f"| {r['runtime']} | {r.get('threads') or ''} | {r['tokens_per_s']:.1f} | {r['tokens']} |")
    (a.work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
