"""RWKV-7 on CPU against llama.cpp (issue #30): the same random weights exported by rwkv-export and
converted by llama.cpp's own converter, measured in one run, rounds interleaved.

    make llamacpp                     # once: llama.cpp from the llama-cpp-python sdist on PyPI, CPU-only, in build/
    python scripts/bench_llamacpp.py --shapes 0.1b,0.4b --threads 2 --rounds 3 --json build/bench-llamacpp.json
    make bench-llama                  # both of the above

For each shape (0.1B: 12 x 768, ffn 3072; 0.4B: 24 x 1024, ffn 4096; head size 64, vocab 65536, LoRA
ranks as BlinkDL's models) one random checkpoint is written twice: as BlinkDL's ``.pth`` (what
rwkv-export reads) and as the Hugging Face layout llama.cpp's ``convert_hf_to_gguf.py`` reads
(``model.layers.N.attention.*``, config.json with the LoRA ranks, the World vocabulary file). Then:

  - ours: ``rwkv-export export`` fp32 / int8 / int4 (default options: one shared weights file),
    each export in a fresh process (time, peak RSS), disk = every file of the export;
  - llama.cpp: ``convert_hf_to_gguf.py --outtype f32`` (time, peak RSS), then ``llama-quantize`` to
    Q8_0 / Q4_0 / Q4_K_M (time added to the conversion's: convert+quantize), disk = the .gguf;
  - decode (tokens/s, one sequence) and prefill 512 (tokens/s), and the peak RSS of the process
    doing them: ours through ``rwkv_runtime.Session`` in a fresh process, llama.cpp through
    ``llama-bench -p 512 -n N`` in a fresh process (its peak RSS from the kernel's rusage);
  - the single-op decode ceiling of each of our exports (scripts/bench_ceiling.py), same run.

Pairs: fp32 / F32, int8 / Q8_0, int4 / Q4_0 (Q4_K_M: llama.cpp's default 4-bit, listed beside).
Every measurement is repeated ``--rounds`` times, the engines interleaved within a round; the best
round is reported (the machine's noise only ever slows a run down). Ratios are ours / llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

SHAPES = {"0.1b": dict(n_layer=12, n_embd=768, ffn=3072), "0.4b": dict(n_layer=24, n_embd=1024, ffn=4096)}
VOCAB = 65536
LORA = {"0.1b": (64, 64, 32, 128), "0.4b": (64, 64, 32, 128)}  # decay, iclr, value residual, gate
PAIRS = [("fp32", "F32"), ("int8", "Q8_0"), ("int4", "Q4_0"), (None, "Q4_K_M")]


def timed_child(cmd, env=None, cwd=None) -> tuple[float, float, str]:
    """(seconds, peak RSS MB of this child, stdout) of a command run in a fresh process. The peak comes
    from a wrapper's own rusage, so earlier, larger children cannot mask it."""
    wrap = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr)\n"
        "print(json.dumps({'rc': r.returncode, 's': time.perf_counter() - t, 'out': r.stdout,\n"
        "  'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
    )
    r = subprocess.run([sys.executable, "-c", wrap, *map(str, cmd)], capture_output=True, text=True, env=env, cwd=cwd)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"failed ({res['rc']}): {' '.join(map(str, cmd))[:200]}\n{r.stderr[-2000:]}")
    return res["s"], res["rss"], res["out"]


# --------------------------------------------------------------------------------------------
# The same weights in both layouts
# --------------------------------------------------------------------------------------------
def write_checkpoints(shape: str, d: Path) -> tuple[Path, Path]:
    """(BlinkDL .pth, Hugging Face folder) holding the same random RWKV-7 weights."""
    import torch
    from bench_scale import random_rwkv7

    d.mkdir(parents=True, exist_ok=True)
    pth, hf = d / f"rwkv7-{shape}.pth", d / f"rwkv7-{shape}-hf"
    if not pth.exists():
        random_rwkv7(pth, vocab=VOCAB, lora=LORA[shape], **SHAPES[shape])
    if not (hf / "model.safetensors").exists():
        hf.mkdir(exist_ok=True)
        w = torch.load(pth, weights_only=True, mmap=True)
        save_hf(w, hf, shape)
    return pth, hf


def hf_name(k: str) -> str:
    """A BlinkDL key under the names llama.cpp's converter maps for RWKV-7 (gguf-py tensor_mapping)."""
    if k == "emb.weight":
        return "model.embeddings.weight"
    if k.startswith("blocks.0.ln0."):
        return "model.layers.0.pre_norm." + k.rsplit(".", 1)[1]
    if k.startswith("ln_out."):
        return "model.ln_out." + k.rsplit(".", 1)[1]
    if k.startswith("head."):
        return k
    _, i, rest = k.split(".", 2)
    rest = rest.replace("att.", "attention.", 1).replace("ffn.", "feed_forward.", 1)
    return f"model.layers.{i}.{rest}"


def save_hf(w: dict, hf: Path, shape: str) -> None:
    from safetensors.torch import save_file

    s, (dw, da, dv, dg) = SHAPES[shape], LORA[shape]
    save_file({hf_name(k): v.contiguous() for k, v in w.items()}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["RWKV7ForCausalLM"],
                "model_type": "rwkv7",
                "hidden_size": s["n_embd"],
                "num_hidden_layers": s["n_layer"],
                "intermediate_size": s["ffn"],
                "head_size": 64,
                "layer_norm_epsilon": 1e-5,
                "vocab_size": VOCAB,
                "lora_rank_decay": dw,
                "lora_rank_iclr": da,
                "lora_rank_value_residual_mix": dv,
                "lora_rank_gate": dg,
                "torch_dtype": "float32",
            }
        )
    )
    import rwkv  # BlinkDL's package ships the World vocabulary llama.cpp's converter reads

    shutil.copy(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt", hf / "rwkv_vocab_v20230424.txt")


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
_OURS = r"""
import json, resource, sys, time
import numpy as np
from rwkv_runtime import Session
from rwkv_runtime.bench import decode_tps, prefill_tps
s = Session(sys.argv[1], threads=int(sys.argv[2]))
out = {"decode_tps": decode_tps(s, 1, int(sys.argv[3])), "prefill_tps": prefill_tps(s, int(sys.argv[4]), repeats=1)}
out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def export_ours(pth: Path, out: Path, fmt: str) -> dict:
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    cmd = [REPO / ".venv" / "bin" / "rwkv-export", "export", pth, "-o", out, "--tokenizer", "none", "-q"]
    if fmt != "fp32":
        cmd += ["--quantize", fmt]
    if not Path(cmd[0]).exists():
        cmd[0] = shutil.which("rwkv-export") or "rwkv-export"
    s, rss, _ = timed_child(cmd)
    return {
        "convert_s": s,
        "convert_rss_mb": rss,
        "disk_mb": sum(p.stat().st_size for p in out.parent.iterdir()) / 2**20,
    }


def run_ours(model: Path, threads: int, decode: int, prefill: int) -> dict:
    _, _, out = timed_child([sys.executable, "-c", _OURS, model, threads, decode, prefill])
    return json.loads(out.strip().splitlines()[-1])


def convert_gguf(llama: Path, hf: Path, d: Path, kind: str, threads: int, f32: Path | None) -> dict:
    src = llama / "src"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    out = d / f"{hf.name}-{kind.lower()}.gguf"
    if kind == "F32":
        s, rss, _ = timed_child(
            [sys.executable, src / "convert_hf_to_gguf.py", hf, "--outtype", "f32", "--outfile", out], env=env
        )
        return {"path": out, "convert_s": s, "convert_rss_mb": rss, "disk_mb": out.stat().st_size / 2**20}
    s, rss, _ = timed_child([llama / "build" / "bin" / "llama-quantize", f32, out, kind, threads])
    return {"path": out, "quantize_s": s, "convert_rss_mb": rss, "disk_mb": out.stat().st_size / 2**20}


def run_llama(llama: Path, gguf: Path, threads: int, decode: int, prefill: int) -> dict:
    _, rss, out = timed_child(
        [
            llama / "build" / "bin" / "llama-bench",
            "-m",
            gguf,
            "-t",
            threads,
            "-p",
            prefill,
            "-n",
            decode,
            "-r",
            1,
            "-o",
            "json",
        ]
    )
    res = {"rss_mb": rss}
    for r in json.loads(out):
        res["prefill_tps" if r["n_prompt"] else "decode_tps"] = r["avg_ts"]
    return res


def best(rounds: list, key: str, low: bool = False):
    vals = [r[key] for r in rounds if key in r]
    return (min(vals) if low else max(vals)) if vals else None


def bench_shape(shape: str, args) -> list:
    from bench_ceiling import ceiling_tps, step_weight_bytes

    d = Path(args.work) / shape
    pth, hf = write_checkpoints(shape, d)
    llama = Path(args.llama)
    ours, theirs = {}, {}
    for fmt, kind in PAIRS:  # exports/conversions once each (timed); their speed in the rounds below
        if fmt:
            ours[fmt] = export_ours(pth, d / f"ours-{fmt}" / "m.onnx", fmt)
            ours[fmt]["path"] = d / f"ours-{fmt}" / "m.onnx"
        theirs[kind] = convert_gguf(llama, hf, d, kind, args.threads, theirs.get("F32", {}).get("path"))
    for fmt in ours:
        info = step_weight_bytes(ours[fmt]["path"])
        ours[fmt]["ceiling_tps"] = (
            ceiling_tps(dict(info, bytes=min(info["bytes"], 2**30)), args.threads)["ceiling"]
            * min(info["bytes"], 2**30)
            / info["bytes"]
        )
    runs = {k: [] for k in [*ours, *theirs]}
    for r in range(args.rounds):
        for fmt, kind in PAIRS:
            if fmt:
                runs[fmt].append(run_ours(ours[fmt]["path"], args.threads, args.decode, args.prefill))
            runs[kind].append(run_llama(llama, theirs[kind]["path"], args.threads, args.decode, args.prefill))
            print(
                f"# {shape} round {r + 1}: {fmt} {runs[fmt][-1] if fmt else ''} {kind} {runs[kind][-1]}",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    f32_convert = theirs["F32"]["convert_s"]
    for fmt, kind in PAIRS:
        t = theirs[kind]
        lrow = {
            "decode_tps": best(runs[kind], "decode_tps"),
            "prefill_tps": best(runs[kind], "prefill_tps"),
            "rss_mb": best(runs[kind], "rss_mb", low=True),
            "disk_mb": t["disk_mb"],
            "convert_s": f32_convert + t.get("quantize_s", 0) * (kind != "F32"),
            "convert_rss_mb": t["convert_rss_mb"],
        }
        row = {"shape": shape, "ours": fmt, "llama": kind, "llama_cpp": lrow}
        if fmt:
            o = ours[fmt]
            orow = {
                "decode_tps": best(runs[fmt], "decode_tps"),
                "prefill_tps": best(runs[fmt], "prefill_tps"),
                "rss_mb": best(runs[fmt], "rss_mb", low=True),
                "disk_mb": o["disk_mb"],
                "convert_s": o["convert_s"],
                "convert_rss_mb": o["convert_rss_mb"],
                "ceiling_tps": o["ceiling_tps"],
            }
            row["rwkv_export"] = orow
            row["ratio"] = {
                k: orow[k] / lrow[k]
                for k in ("decode_tps", "prefill_tps", "rss_mb", "disk_mb", "convert_s")
                if orow.get(k) and lrow.get(k)
            }
        rows.append(row)
    if not args.keep:
        shutil.rmtree(d)
    return rows


def table(rows: list) -> str:
    out = [
        "| shape | ours / llama.cpp | decode tok/s | prefill-512 tok/s | peak RSS MB | disk MB | export / convert+quantize s | ceiling tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lr = r["llama_cpp"]
        if "rwkv_export" not in r:
            out.append(
                f"| {r['shape']} | — / {r['llama']} | — / {lr['decode_tps']:.1f} | — / {lr['prefill_tps']:.0f} | "
                f"— / {lr['rss_mb']:.0f} | — / {lr['disk_mb']:.0f} | — / {lr['convert_s']:.1f} | |"
            )
            continue
        o, q = r["rwkv_export"], r["ratio"]

        def cell(k, f, q=q, o=o, lr=lr):
            return f"{q.get(k, float('nan')):.2f}x ({o[k]:{f}} / {lr[k]:{f}})"

        out.append(
            f"| {r['shape']} | {r['ours']} / {r['llama']} | {cell('decode_tps', '.1f')} | {cell('prefill_tps', '.0f')} | "
            f"{cell('rss_mb', '.0f')} | {cell('disk_mb', '.0f')} | {cell('convert_s', '.1f')} | {o['ceiling_tps']:.1f} |"
        )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="0.1b,0.4b")
    ap.add_argument(
        "--llama", default=str(REPO / "build" / "llamacpp"), help="folder with src/ and build/bin/ (make llamacpp)"
    )
    ap.add_argument("--work", default=str(REPO / "build" / "bench-llamacpp"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", type=int, default=128, help="tokens decoded per measurement")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and exports")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not (Path(args.llama) / "build" / "bin" / "llama-bench").is_file():
        raise SystemExit(f"no llama.cpp build in {args.llama} (make llamacpp)")
    rows = []
    for shape in args.shapes.split(","):
        rows += bench_shape(shape, args)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"threads": args.threads, "rounds": args.rounds, "time": time.strftime("%Y-%m-%d %H:%M"), "rows": rows},
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
