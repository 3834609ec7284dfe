"""Scale benchmark (issue 18): export and run random RWKV-7 models of real sizes.

For each shape: write a random fp32 checkpoint, then in fresh processes (so each peak RSS is its own)
  export   wall time, peak RSS (vs the bytes of weights written), files and disk size
  session  load time and peak RSS, decode tokens/s against the same-run bandwidth ceiling
           (scripts/bench_ceiling.py: one op streaming the step's weight bytes), prefill tokens/s.
Heavy: the 0.4B shape needs ~2 GB of disk per precision and a few minutes; 1.5B ~6 GB and ~15 min.
Not part of CI (`make bench-scale`).

    python scripts/bench_scale.py --shapes 0.4b --precisions fp32 --dir /tmp/scale [--json out.json]

--sources exports the same weights from other checkpoint forms (bf16 .pth, fp32/bf16 .safetensors,
converted from the generated fp32 .pth); --compare-ref REV also runs the exporter of git revision REV
(a temporary worktree, imported through a shim folder on PYTHONPATH, same venv) on the same checkpoint
in the same run, e.g. the exporter before the streaming export:

    python scripts/bench_scale.py --shapes 0.4b --precisions fp32 --export-only --compare-ref 2ddd500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("fp32.pth", "bf16.pth", "fp32.safetensors", "bf16.safetensors")

# n_layer, n_embd, ffn, vocab, LoRA dims (w, a, v, g): the published RWKV-7 "Goose" shapes
SHAPES = {
    "tiny": dict(n_layer=2, n_embd=128, ffn=512, vocab=1024, lora=(16, 16, 16, 32)),  # for tests
    "0.1b": dict(n_layer=12, n_embd=768, ffn=3072, vocab=65536, lora=(64, 64, 32, 128)),
    "0.4b": dict(n_layer=24, n_embd=1024, ffn=4096, vocab=65536, lora=(64, 64, 32, 128)),
    "1.5b": dict(n_layer=24, n_embd=2048, ffn=8192, vocab=65536, lora=(96, 96, 64, 256)),
    "3b": dict(n_layer=32, n_embd=2560, ffn=10240, vocab=65536, lora=(96, 96, 64, 320)),
}
HEAD_SIZE = 64


def random_rwkv7(
    path: Path, n_layer: int, n_embd: int, ffn: int, vocab: int, lora=(16, 16, 16, 32), seed: int = 0
) -> Path:
    """A BlinkDL-layout RWKV-7 .pth with random weights in ranges that keep activations finite."""
    import torch

    g = torch.Generator().manual_seed(seed)
    C, H = n_embd, n_embd // HEAD_SIZE
    dw, da, dv, dg = lora

    def rn(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    def ru(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    w = {
        "emb.weight": rn(vocab, C, s=1e-2),
        "blocks.0.ln0.weight": torch.ones(C),
        "blocks.0.ln0.bias": torch.zeros(C),
        "ln_out.weight": torch.ones(C),
        "ln_out.bias": torch.zeros(C),
        "head.weight": rn(vocab, C, s=C**-0.5),
    }
    for i in range(n_layer):
        b = f"blocks.{i}."
        w.update(
            {
                b + "ln1.weight": torch.ones(C),
                b + "ln1.bias": torch.zeros(C),
                b + "ln2.weight": torch.ones(C),
                b + "ln2.bias": torch.zeros(C),
                b + "att.w0": ru(1, 1, C, lo=-6, hi=-1),
                b + "att.a0": rn(1, 1, C, s=0.1),
                b + "att.k_k": ru(1, 1, C, lo=0.7, hi=1.0),
                b + "att.k_a": ru(1, 1, C, lo=0.8, hi=1.2),
                b + "att.r_k": rn(H, HEAD_SIZE, s=0.1),
                b + "att.ln_x.weight": torch.ones(C),
                b + "att.ln_x.bias": torch.zeros(C),
                b + "ffn.x_k": ru(1, 1, C),
            }
        )
        for m in "rwkvag":
            w[b + "att.x_" + m] = ru(1, 1, C)
        for n, d in (("w", dw), ("a", da), ("g", dg)) + ((("v", dv),) if i > 0 else ()):
            w[b + f"att.{n}1"] = rn(C, d, s=0.1 * C**-0.5)
            w[b + f"att.{n}2"] = rn(d, C, s=0.1 * d**-0.5)
        if i > 0:
            w[b + "att.v0"] = rn(1, 1, C, s=0.1)
        for n in ("key", "value", "receptance", "output"):
            w[b + f"att.{n}.weight"] = rn(C, C, s=C**-0.5)
        w[b + "ffn.key.weight"] = rn(ffn, C, s=C**-0.5)
        w[b + "ffn.value.weight"] = rn(C, ffn, s=ffn**-0.5)
    torch.save(w, path)
    return path


# Peak RSS is VmHWM (this process's own high-water mark): ru_maxrss would carry the parent's peak over
# fork + exec, and the parent may have held a whole checkpoint.
_HWM = r"""
def hwm_mb():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024
"""

_EXPORT = (
    _HWM
    + r"""
import json, sys, time
from rwkv_export.export import ExportOptions, export
import onnx, onnxruntime, torch  # imported before the baseline: the export's own memory is what counts
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer
base = hwm_mb()
t0 = time.perf_counter()
opts = ExportOptions(**json.loads(sys.argv[3]))
paths = export(sys.argv[1], sys.argv[2], opts)
print(json.dumps({"export_s": time.perf_counter() - t0, "export_baseline_rss_mb": base,
                  "export_peak_rss_mb": hwm_mb()}))
"""
)

_SESSION = (
    _HWM
    + r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from rwkv_runtime import Session
from rwkv_runtime.bench import decode_tps, prefill_tps
t1 = time.perf_counter()
s = Session(sys.argv[1], threads=int(sys.argv[2]))
out = {"load_s": time.perf_counter() - t1}
out["decode_tps"] = decode_tps(s, 1, int(sys.argv[3]))
out["prefill_tps"] = prefill_tps(s, int(sys.argv[4]), repeats=1)
out["session_peak_rss_mb"] = hwm_mb()
print(json.dumps(out))
"""
)


def _child(code: str, *args, env=None) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"child failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def convert(src: Path, dst: Path) -> Path:
    """The fp32 .pth ``src`` as ``dst`` (named like SOURCES: dtype and format), the same values."""
    import torch

    dtype = torch.bfloat16 if "bf16" in dst.name else torch.float32
    w = {k: v.to(dtype).contiguous() for k, v in torch.load(src, weights_only=True, mmap=True).items()}
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(w, str(dst))
    else:
        torch.save(w, dst)
    return dst


class RefExporter:
    """The exporter of an older git revision, for the same-run comparison: a worktree of ``rev`` in a
    temporary folder and a shim folder whose rwkv_export / rwkv_runtime point into it (pyproject maps
    them from exporter/ and runtime/), first on PYTHONPATH so they win over the editable install."""

    def __init__(self, rev: str):
        self.rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-scale-ref-"))
        self.tree = self.tmp / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(self.tree), self.rev],
            check=True,
            capture_output=True,
        )
        shim = self.tmp / "shim"
        shim.mkdir()
        (shim / "rwkv_export").symlink_to(self.tree / "exporter")
        (shim / "rwkv_runtime").symlink_to(self.tree / "runtime")
        self.env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(
                [str(shim)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            ),
        )
        check = subprocess.run(
            [sys.executable, "-c", "import rwkv_export; print(rwkv_export.__file__)"],
            env=self.env,
            capture_output=True,
            text=True,
        )
        if not check.stdout.strip().startswith(str(shim)):
            raise SystemExit(f"--compare-ref: rwkv_export did not resolve to {shim} ({check.stdout.strip()})")

    def close(self):
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(self.tree)], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    import os

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM"


def _export_row(ck: Path, out: Path, opts: dict, env=None) -> dict:
    """One export in a fresh process: time, peak RSS, files (the folder is emptied first)."""
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    row = _child(_EXPORT, ck, out, json.dumps(opts), env=env)
    files = {p.name: p.stat().st_size for p in out.parent.iterdir()}
    row["files"] = files
    row["disk_mb"] = sum(files.values()) / 2**20
    # the weights written: the shared file (or, an older exporter, every graph's own data file)
    row["weights_mb"] = sum(n for f, n in files.items() if f.endswith(".data")) / 2**20
    row["export_rss_over_weights"] = row["export_peak_rss_mb"] / max(row["weights_mb"], 1e-9)
    row["export_delta_over_weights"] = (row["export_peak_rss_mb"] - row["export_baseline_rss_mb"]) / max(
        row["weights_mb"], 1e-9
    )
    return row


def run_shape(
    name: str,
    precisions,
    d: Path,
    threads: int,
    steps: int,
    plen: int,
    keep: bool,
    sources=("fp32.pth",),
    session: bool = True,
    ref: RefExporter | None = None,
) -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ceiling import ceiling_tps, step_weight_bytes

    d.mkdir(parents=True, exist_ok=True)
    ck = d / f"rwkv7-{name}.pth"
    t0 = time.perf_counter()
    made = []
    if not ck.exists():  # in a child: this process stays small (its children start from its size)
        subprocess.run([sys.executable, __file__, "--generate", name, str(ck)], check=True)
        made.append(ck)
    gen_s = time.perf_counter() - t0
    cks = {}
    for src in sources:
        cks[src] = ck if src == "fp32.pth" else d / f"rwkv7-{name}-{src}"
        if not cks[src].exists():
            subprocess.run([sys.executable, __file__, "--convert", str(ck), str(cks[src])], check=True)
            made.append(cks[src])
    os.sync()  # the checkpoints on disk, as a user's are: no export pays for writing them back
    rows = []
    for src in sources:
        for prec in precisions:
            out = d / f"r7-{name}-{prec}" / "m.onnx"
            opts = {"external_data": True}
            if prec in ("int8", "int4"):
                opts["quantize"] = prec
            else:
                opts["precision"] = prec
            row = {
                "shape": name,
                "precision": prec,
                "source": src,
                "exporter": "this",
                "checkpoint_mb": cks[src].stat().st_size / 2**20,
                "generate_s": gen_s,
            }
            row.update(_export_row(cks[src], out, opts))
            if session:
                row.update(_child(_SESSION, out, threads, steps, plen))
                row["session_rss_over_weights"] = row["session_peak_rss_mb"] / max(row["weights_mb"], 1e-9)
                info = step_weight_bytes(out)
                # the ceiling op is built in memory (protobuf: < 2 GB): measure 1 GiB, scale to the step's bytes
                capped = dict(info, bytes=min(info["bytes"], 2**30))
                ceil = ceiling_tps(capped, threads)
                row["ceiling_tps"] = ceil["ceiling"] * capped["bytes"] / info["bytes"]
                row["decode_vs_ceiling"] = row["decode_tps"] / row["ceiling_tps"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if ref is not None:  # the older exporter, same checkpoint, right after
                rrow = {
                    "shape": name,
                    "precision": prec,
                    "source": src,
                    "exporter": ref.rev,
                    "checkpoint_mb": row["checkpoint_mb"],
                    "generate_s": gen_s,
                }
                rrow.update(_export_row(cks[src], out, opts, env=ref.env))
                rows.append(rrow)
                print(json.dumps(rrow), flush=True)
            if not keep:
                shutil.rmtree(out.parent)
    if not keep:
        for f in made:
            f.unlink()
    return rows


def main():
    if sys.argv[1:2] == ["--generate"]:
        random_rwkv7(Path(sys.argv[3]), **SHAPES[sys.argv[2]])
        return
    if sys.argv[1:2] == ["--convert"]:
        convert(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="0.4b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--precisions", default="fp32", help="comma-separated: fp32, fp16, int8, int4")
    ap.add_argument(
        "--sources", default="fp32.pth", help=f"comma-separated checkpoint forms exported, of {', '.join(SOURCES)}"
    )
    ap.add_argument("--export-only", action="store_true", help="no session, decode or prefill measurements")
    ap.add_argument(
        "--compare-ref",
        metavar="REV",
        help="also run the exporter of git revision REV on the same checkpoints (export only)",
    )
    ap.add_argument("--dir", default="build/scale", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed")
    ap.add_argument("--prefill", type=int, default=64, help="prompt length for prefill tokens/s")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and exports")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    sources = [x.strip() for x in a.sources.split(",")]
    bad = [x for x in sources if x not in SOURCES]
    if bad:
        ap.error(f"--sources: {', '.join(bad)} not among {', '.join(SOURCES)}")
    print(f"machine: {machine()}", flush=True)
    ref = RefExporter(a.compare_ref) if a.compare_ref else None
    rows = []
    try:
        for name in a.shapes.split(","):
            rows += run_shape(
                name.strip(),
                [p.strip() for p in a.precisions.split(",")],
                a.dir,
                a.threads,
                a.steps,
                a.prefill,
                a.keep,
                sources,
                not a.export_only,
                ref,
            )
    finally:
        if ref is not None:
            ref.close()
    print(
        f"\n{'shape':<6}{'prec':<6}{'source':<17}{'exporter':<9}{'export s':>9}{'exp RSS GB':>11}{'x wts':>6}"
        f"{'disk GB':>8}{'load s':>7}{'run RSS GB':>11}{'x wts':>6}{'dec tok/s':>10}{'ceiling':>8}{'pre tok/s':>10}"
    )
    for r in rows:
        line = (
            f"{r['shape']:<6}{r['precision']:<6}{r['source']:<17}{r['exporter']:<9}{r['export_s']:>9.1f}"
            f"{r['export_peak_rss_mb'] / 1024:>11.2f}{r['export_rss_over_weights']:>6.2f}"
            f"{r['disk_mb'] / 1024:>8.2f}"
        )
        if "load_s" in r:
            line += (
                f"{r['load_s']:>7.1f}{r['session_peak_rss_mb'] / 1024:>11.2f}{r['session_rss_over_weights']:>6.2f}"
                f"{r['decode_tps']:>10.2f}{r['ceiling_tps']:>8.2f}{r['prefill_tps']:>10.1f}"
            )
        print(line)
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
