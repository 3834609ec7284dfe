"""Load benchmark of the OpenAI-compatible server (loopback only; stops by itself).

    python scripts/bench_serve.py MODEL [--streams 1,4,16,32] [--tokens 64] [--prompt-tokens 32]

Starts ``python -m rwkv_runtime.server MODEL`` on 127.0.0.1 (a separate process, so the client does not
share its interpreter), then for each level runs N concurrent streaming completions with different
token-id prompts (greedy, fixed length) and reports aggregate generated tokens/s, p50/p99 time to first
token and inter-token latency. Next to each level: the ceiling measured in the same run, the raw
``Session.step`` loop at batch N without any server (what the scheduler could at best deliver).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in out if ln.startswith("Model name")), platform.processor())
    except (OSError, subprocess.SubprocessError):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} CPUs visible"


def ceiling(model: str, levels: list, steps: int, threads, decode_graph: str = "auto") -> dict:
    """Raw batched decode tokens/s with the runtime alone (no HTTP, no scheduler)."""
    from rwkv_runtime import Session

    s = Session(model, threads=threads, decode_graph=decode_graph)
    out = {}
    for n in levels:
        st = s.new_state(n)
        toks = np.arange(n, dtype=np.int64) % s.vocab_size
        _, st = s.step(toks, st)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            _, st = s.step(toks, st)
        out[n] = n * steps / (time.perf_counter() - t0)
    return out


async def one_stream(client, url, prompt, tokens):
    body = {
        "model": "m",
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    arrivals, generated = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                generated = ev["usage"]["completion_tokens"]
            elif ev["choices"] and ev["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    return t0, arrivals, generated


async def level(url, n, tokens, prompt_tokens, vocab, seed):
    import httpx

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, prompt_tokens).tolist() for _ in range(n)]
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_stream(c, url, p, tokens) for p in prompts))
        wall = time.perf_counter() - t0
    ttft = [a[0] - s for s, a, _ in res if a]
    itl = [d for _, a, _ in res for d in np.diff(a)]
    total = sum(g for _, _, g in res)
    pct = lambda xs, q: float(np.percentile(xs, q) * 1000) if len(xs) else float("nan")  # noqa: E731
    return {
        "streams": n,
        "tokens": total,
        "wall_s": wall,
        "tok_s": total / wall,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50),
        "itl_p99_ms": pct(itl, 99),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--streams", default="1,4,16,32")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per stream")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads (server and ceiling)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--timeout", type=float, default=900, help="give up after this many seconds in all")
    ap.add_argument("--decode-graph", default="auto", choices=["auto", "step"], help="the server's --decode-graph")
    a = ap.parse_args()
    # the server runs from the repository root: a path relative to where this was started must survive that
    a.model = str(Path(a.model).resolve())
    if not Path(a.model).is_file():
        raise SystemExit(f"Error: {a.model}: no such file")
    levels = [int(x) for x in a.streams.split(",")]
    deadline = time.monotonic() + a.timeout

    from rwkv_runtime import Session

    vocab = Session(a.model).vocab_size
    print(f"machine: {machine()}", flush=True)
    ceil = ceiling(a.model, levels, max(8, a.tokens // 4), a.threads, a.decode_graph)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "rwkv_runtime.server",
        a.model,
        "--port",
        str(port),
        "--model-name",
        "m",
        "--max-batch",
        str(max(levels)),
        "--log-level",
        "warning",
        "--cache-mb",
        "0",
    ]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    cmd += ["--decode-graph", a.decode_graph]
    server = subprocess.Popen(cmd, cwd=REPO)  # its stderr is ours: why it failed to start, if it does
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        import httpx

        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        asyncio.run(level(url, 1, 8, a.prompt_tokens, vocab, 99))  # warm-up
        for n in levels:
            if time.monotonic() > deadline:
                print(f"stopping: --timeout reached before {n} streams", flush=True)
                break
            r = asyncio.run(level(url, n, a.tokens, a.prompt_tokens, vocab, n))
            r["ceiling_tok_s"] = ceil[n]
            rows.append(r)
            print(json.dumps(r), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    print("\n| streams | aggregate tok/s | ceiling tok/s (raw step, batch N) | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['streams']} | {r['tok_s']:.1f} | {r['ceiling_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} / "
            f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |"
        )
    by = {r["streams"]: r for r in rows}
    if 1 in by and max(levels) in by:
        print(
            f"\naggregate throughput, {max(levels)} streams vs 1: {by[max(levels)]['tok_s'] / by[1]['tok_s']:.1f}x "
            f"(raw step ceiling: {ceil[max(levels)] / ceil[1]:.1f}x)"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
