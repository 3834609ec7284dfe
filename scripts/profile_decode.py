"""Where an RWKV-7 decode step goes (issue #30): node counts per op type, time per op type, and a
single-thread step time, on a random RWKV-7 of the 0.1B shape (12 x 768, ffn 3072, head 64, vocab 65536).

    python scripts/profile_decode.py export --formats fp32,int4        # checkpoint + exports in build/profile-decode
    python scripts/profile_decode.py profile build/profile-decode/int4/m.onnx
    python scripts/profile_decode.py compare A/m.onnx B/m.onnx          # A/B in one process, alternated
    python scripts/profile_decode.py rss build/profile-decode/int4/m.onnx --variant arena_off

``profile``: the runtime decodes through the sequence graph (T = 1 takes the WKV If's one-token branch),
so that graph is loaded as the runtime loads it (``rwkv_runtime.Session``, ORT_ENABLE_ALL, one thread)
with onnxruntime's profiler on; the node events of the decode steps give the count per step and the
share of kernel time per op type. The optimized model (``--optimized PATH``) shows what onnxruntime fused.
Timings are CPU time (``time.process_time``) per step, best of ``--rounds`` blocks of ``--steps`` steps.

``rss``: a fresh process loads the export, prefills 512 tokens and decodes 128, and prints its peak RSS
(``ru_maxrss``) and the decode/prefill CPU time, with the session options of ``--variant``; variants
run in turn, each in its own process, ``--rounds`` times (a second session in one process runs 5-15%
faster than the first, so in-process A/B of session options is biased by creation order).
Measurement only: never run by the tests.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
SHAPE = dict(n_layer=12, n_embd=768, ffn=3072)
LORA = (64, 64, 32, 128)  # decay, iclr, value residual, gate (BlinkDL's 0.1B)
VOCAB = 65536


def make_checkpoint(work: Path) -> Path:
    from bench_scale import random_rwkv7

    pth = work / "rwkv7-0.1b.pth"
    if not pth.exists():
        work.mkdir(parents=True, exist_ok=True)
        random_rwkv7(pth, vocab=VOCAB, lora=LORA, **SHAPE)
    return pth


def export(pth: Path, out: Path, fmt: str, extra=()) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    exe = REPO / ".venv" / "bin" / "rwkv-export"
    cmd = [str(exe), "export", str(pth), "-o", str(out), "--tokenizer", "none", "-q", *extra]
    if fmt != "fp32":
        cmd += ["--quantize", fmt]
    subprocess.run(cmd, check=True)
    return out


def session(model, profile: str | None = None, optimized: str | None = None, threads: int = 1, mem_pattern=True):
    import onnxruntime as ort

    from rwkv_runtime import Session

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_mem_pattern = mem_pattern
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    if optimized:
        so.optimized_model_filepath = optimized
    return Session(str(model), session_options=so)


def step_ms(s, steps: int, rounds: int = 1, state=None):
    """Best CPU ms per step over ``rounds`` blocks of ``steps`` decode steps; returns (ms, state)."""
    import numpy as np

    rng = np.random.default_rng(0)
    st = state if state is not None else s.new_state(1)
    best = float("inf")
    for _ in range(rounds):
        ids = rng.integers(0, s.vocab_size, size=(steps, 1))
        t0 = time.process_time()
        for j in range(steps):
            _, st = s.step(ids[j], st)
        best = min(best, (time.process_time() - t0) / steps * 1e3)
    return best, st


def cmd_profile(a):
    model = Path(a.model)
    prefix = str(Path(a.out or model.parent) / "decode_profile")
    s = session(model, profile=prefix, optimized=a.optimized, mem_pattern=not a.no_mem_pattern)
    warm, st = step_ms(s, 8)
    n_steps = a.steps
    _, st = step_ms(s, n_steps, 1, st)
    trace = s.backend.session(s.backend.decode_kind).end_profiling()
    events = json.loads(Path(trace).read_text())
    count, dur = collections.Counter(), collections.Counter()
    runs, inner = 0, 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs += 1
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        count[op] += 1
        dur[op] += e.get("dur", 0)
        if "/" in e["name"]:  # a node inside an If branch (the body builders prefix their node names)
            inner += e.get("dur", 0)
    # an If's time includes its branch's nodes, which have their own events: keep only its own cost
    dur["If"] -= inner
    total = sum(dur.values())
    steps = max(runs, 1)  # the warm-up runs are in the trace too: per-run figures divide by all runs
    print(
        f"{model}: {runs} runs profiled, {sum(count.values()) / steps:.0f} nodes per step, "
        f"kernel time {total / steps / 1e3:.2f} ms per step (profiler on)"
    )
    print("If: its own cost, without the nodes of the branch it runs (counted under their op types)")
    print(f"{'op':28s} {'per step':>9s} {'share':>7s} {'us/node':>8s}")
    for op, d in dur.most_common():
        print(f"{op:28s} {count[op] / steps:9.1f} {d / total:7.1%} {d / count[op]:8.1f}")
    os.unlink(trace)
    if a.optimized:
        import onnx

        m = onnx.load(a.optimized, load_external_data=False)
        c = collections.Counter()

        def walk(graph):
            for n in graph.node:
                c[n.op_type] += 1
                for at in n.attribute:
                    if at.type == at.GRAPH:
                        walk(at.g)

        walk(m.graph)
        print("optimized model (both If branches):", dict(c.most_common()))
    s2 = session(model, mem_pattern=not a.no_mem_pattern)
    ms, _ = step_ms(s2, a.steps, a.rounds)
    print(f"decode step, 1 thread, profiler off: {ms:.3f} ms CPU (best of {a.rounds} x {a.steps})")


def cmd_compare(a):
    """Alternate the sessions in one process; best of rounds per model."""
    sess = [session(m) for m in a.models]
    states = [step_ms(s, 8)[1] for s in sess]  # warm-up
    best = [float("inf")] * len(sess)
    for _ in range(a.rounds):
        for i, s in enumerate(sess):
            ms, states[i] = step_ms(s, a.steps, 1, states[i])
            best[i] = min(best[i], ms)
    for m, b in zip(a.models, best):
        print(f"{b:8.3f} ms/step  {m}")


_RSS = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime as ort
from rwkv_runtime import Session
variant = sys.argv[2]
so = None
# "runtime": the runtime's own options (ort_backend); "noshrink": those without shrinking the arena after
# prefill runs (the runtime before issue #30); anything else: these SessionOptions (no shrinking then)
if variant not in ("runtime", "noshrink"):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = int(sys.argv[3]), 1
    for v in variant.split("+"):
        if v == "arena_off":
            so.enable_cpu_mem_arena = False
        elif v == "mempattern_off":
            so.enable_mem_pattern = False
        elif v in ("env_alloc", "env_same"):  # the environment's allocator (env_same: kSameAsRequested arena)
            if v == "env_same":
                mi = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(mi, ort.OrtArenaCfg(0, 1, -1, -1))
            so.add_session_config_entry("session.use_env_allocators", "1")
        elif v.startswith("cfg:"):
            k, val = v[4:].split("=")
            so.add_session_config_entry(k, val)
        elif v != "base":
            raise SystemExit("unknown variant " + v)
s = Session(sys.argv[1], threads=int(sys.argv[3]), session_options=so)
if "noshrink" in variant:  # the runtime before it shrank the arena after prefill runs
    s.backend._prefill_run_options = None
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ids = np.random.default_rng(1).integers(0, s.vocab_size, size=(1, 512))
t0 = time.process_time(); logits, st = s.prefill(ids); pre = time.process_time() - t0
rss_pre = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
tok = ids[:, -1]
t0 = time.process_time()
for _ in range(128):
    logits, st = s.step(tok, st)
dec = (time.process_time() - t0) / 128 * 1e3
print(json.dumps({"rss_load": rss_load, "rss_prefill": rss_pre,
                  "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "prefill_s": pre, "decode_ms": dec}))
"""


def cmd_rss(a):
    for r in range(a.rounds):
        for v in a.variant:
            out = subprocess.run(
                [sys.executable, "-c", _RSS, a.model, v, str(a.threads)], capture_output=True, text=True, check=True
            ).stdout
            res = json.loads(out.strip().splitlines()[-1])
            print(f"round {r + 1} {v:40s} " + " ".join(f"{k} {x:.3f}" for k, x in res.items()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="random 0.1B checkpoint + exports")
    e.add_argument("--work", default=str(REPO / "build" / "profile-decode"))
    e.add_argument("--formats", default="fp32,int4")
    e.add_argument("--tag", default="", help="suffix of the export folders (A/B of exporter changes)")
    p = sub.add_parser("profile")
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out")
    p.add_argument("--optimized", help="write onnxruntime's optimized sequence graph here")
    p.add_argument("--no-mem-pattern", action="store_true", help="SessionOptions.enable_mem_pattern = False")
    c = sub.add_parser("compare")
    c.add_argument("models", nargs="+")
    c.add_argument("--steps", type=int, default=64)
    c.add_argument("--rounds", type=int, default=5)
    r = sub.add_parser("rss")
    r.add_argument("model")
    r.add_argument(
        "--variant", action="append", default=None, help="runtime, noshrink, base, arena_off, ... ('+' joins)"
    )
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if a.cmd == "export":
        work = Path(a.work)
        pth = make_checkpoint(work)
        for fmt in a.formats.split(","):
            t = time.perf_counter()
            out = export(pth, work / f"{fmt}{a.tag}" / "m.onnx", fmt)
            print(f"{out} ({time.perf_counter() - t:.1f} s)")
    elif a.cmd == "profile":
        cmd_profile(a)
    elif a.cmd == "compare":
        cmd_compare(a)
    else:
        a.variant = a.variant or ["runtime"]
        cmd_rss(a)


if __name__ == "__main__":
    main()
