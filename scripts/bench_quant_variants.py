"""Which weight format streams fastest in onnxruntime on CPU, and what each costs in accuracy (issue 16).

    python scripts/bench_quant_variants.py --speed build/rwkv4-169m.onnx --accuracy default,v4,v5.2,v6,v7 \
        [--variants all] [--rounds 3] [--threads 2] [--json out.json]

Each variant is made from an fp32 export by rewriting its matrix products (``Gemm(x, W[N,K], transB=1)``)
in both graphs, and saved as an export of its own (the manifest's options say which variant):

  nbits{8,4}-b{32,64,128}[-acc{0,4}]  onnxruntime's MatMulNBits: weight-only, symmetric blocks of b along K,
                                       packed by onnxruntime's own quantiser (what ``--quantize`` writes).
                                       accuracy_level 4 computes in int8 (activations quantised per block),
                                       0 dequantises to float32.
  dq8                                  DynamicQuantizeMatMul: int8 weights with one scale per output column,
                                       activations quantised per call (uint8): MLAS's integer GEMM (VNNI).
  ...-head32                           the same, but the head (the largest matrix) kept in float32.

Speed: decode tokens/s at batch 1 and 32 of the 169M-shaped model, each variant in its own process,
interleaved rounds (median, min-max), every figure next to the same-run ceiling of that batch size: one
float32 ``Gemm`` over the model's fp32 bytes (scripts/bench_ceiling.py). Accuracy: cross-entropy on the
held-out text (exporter/verify/quality.py) of the variant against the float32 PyTorch reference, for the default
model and the reference models in ../shared/reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_vs_blinkdl import run  # noqa: E402  (one subprocess runner for the benchmarks)

REPO = HERE.parent
REFERENCE = REPO.parent / "shared" / "reference" / "models"
CHECKPOINTS = {
    "default": REPO / "exporter" / "default_model" / "tiny-rwkv4-pystdlib.pth",
    "v4": REFERENCE / "tiny-rwkv-4v0-660K.pth",
    "v5.2": REFERENCE / "tiny-rwkv-5v2-730K.pth",
    "v6": REFERENCE / "tiny-rwkv-6v0-1m.pth",
    "v7": REFERENCE / "tiny-rwkv-7v0-834K.pth",
}
VARIANTS = [
    "fp32",
    "nbits8-b32",
    "nbits8-b128",
    "nbits4-b32",
    "nbits4-b64",
    "nbits4-b128",
    "nbits4-b32-acc0",
    "nbits4-b128-head32",
    "dq8",
    "dq8-head32",
]


def _parse(variant: str) -> dict:
    parts = variant.split("-")
    v = {"kind": parts[0], "head32": "head32" in parts, "acc": 4, "block": 32, "bits": 0}
    for p in parts[1:]:
        if p.startswith("b") and p[1:].isdigit():
            v["block"] = int(p[1:])
        elif p.startswith("acc"):
            v["acc"] = int(p[3:])
    if v["kind"].startswith("nbits"):
        v["bits"] = int(v["kind"][5:])
        v["kind"] = "nbits"
    return v


def quantizer(v: dict):
    """The product's own quantiser for a variant (exporter/quantize.py): the bench measures what
    ``--quantize`` writes, not a copy of it."""
    from rwkv_export.quantize import DynamicInt8Quantizer, Quantizer

    return DynamicInt8Quantizer() if v["kind"] == "dq8" else Quantizer(v["bits"], v["block"], v["acc"])


def rewrite(model, variant: str, cache: dict):
    """Replace each Gemm(transB=1) with a constant [N, K] weight by the variant's op (in place).
    ``cache`` maps a weight's name to its quantised tensors: the two graphs of an export share them."""
    import onnx
    from onnx import helper, numpy_helper

    from rwkv_export.quantize import names_read, replace_graph

    v = _parse(variant)
    if v["kind"] == "fp32":
        return model
    q = quantizer(v)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep_inits, nodes, added = [], [], set()
    for node in g.node:
        t = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) == 2 else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            t is None
            or attrs.get("transB") != 1
            or len(t.dims) != 2
            or t.data_type != onnx.TensorProto.FLOAT
            or (v["head32"] and t.name == "head")
        ):
            nodes.append(node)
            continue
        N, K = t.dims
        qname, sname = t.name + "_q", t.name + "_s"
        if t.name not in cache:
            packed, scales = q.quantize(numpy_helper.to_array(t).T)  # the quantisers take [K, N]
            cache[t.name] = [numpy_helper.from_array(packed, qname), numpy_helper.from_array(scales, sname)]
        if t.name not in added:
            keep_inits += cache[t.name]
            added.add(t.name)
        nodes.append(q.node(node.input[0], qname, sname, node.output, node.name, K, N))
    used = names_read(nodes)
    replace_graph(model, nodes, [t for t in g.initializer if t.name in used] + keep_inits)
    return model


def make_variant(fp32_step: Path, variant: str, out_dir: Path) -> Path:
    """An export of its own (both graphs, weights inside the files) holding ``variant``."""
    import onnx

    from rwkv_runtime.manifest import MANIFEST_KEY

    out_dir.mkdir(parents=True, exist_ok=True)
    names = {"step": f"{variant}.onnx", "sequence": f"{variant}.seq.onnx"}
    if (out_dir / names["step"]).exists():
        return out_dir / names["step"]
    cache: dict = {}
    for kind, src in (("sequence", fp32_step.with_name(fp32_step.stem + ".seq.onnx")), ("step", fp32_step)):
        m = onnx.load(str(src))  # weights read into the model (small and 169M-sized models only)
        for t in m.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
        rewrite(m, variant, cache)
        props = {p.key: p for p in m.metadata_props}
        man = json.loads(props[MANIFEST_KEY].value)
        man["companions"] = names
        man["options"].update(weights_file=None, quantize=None if variant == "fp32" else variant)
        props[MANIFEST_KEY].value = json.dumps(man)
        onnx.save_model(m, str(out_dir / names[kind]))
    return out_dir / names["step"]


SPEED = textwrap.dedent("""
    import sys, json
    import rwkv_runtime
    from rwkv_runtime.bench import decode_tps
    s = rwkv_runtime.Session(sys.argv[1], threads=int(sys.argv[2]))
    print(json.dumps({b: decode_tps(s, int(b), int(sys.argv[3]) if b == "1" else 8) for b in sys.argv[4].split(",")}))
""")

CEILING = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, sys.argv[3])
    import bench_ceiling as bc
    print(json.dumps(bc.batched_ceiling_tps(bc.step_weight_bytes(sys.argv[1]), sys.argv[4].split(","), int(sys.argv[2]))))
""")


def accuracy(names: list, variants: list, work: Path) -> dict:
    """{model: {variant: compare_to_reference(...)}} on the held-out text."""
    from rwkv_export.export import ExportOptions, export
    from rwkv_export.verify.quality import compare_to_reference

    out = {}
    for name in names:
        ck = CHECKPOINTS[name]
        base = work / f"acc-{name}"
        base.mkdir(parents=True, exist_ok=True)
        fp32 = base / "fp32-src.onnx"
        if not fp32.exists():
            export(ck, fp32, ExportOptions(external_data=False))
        out[name] = {}
        for v in variants:
            path = make_variant(fp32, v, base / "variants")
            r = compare_to_reference(path, ck)
            out[name][v] = r
            print(
                f"  accuracy {name:8} {v:20} CE {r['ce_model']:.4f} vs {r['ce_reference']:.4f} "
                f"({100 * r['ce_change']:+.2f}%), argmax agreement {100 * r['argmax_agreement']:.1f}%",
                file=sys.stderr,
                flush=True,
            )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed", type=Path, help="an fp32 export (external data) of the 169M-shaped model")
    ap.add_argument("--accuracy", default="default,v4,v5.2,v6,v7", help="models for the cross-entropy cost ('' = none)")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, help="where variants are written (default: a temporary folder)")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    variants = VARIANTS if a.variants == "all" else a.variants.split(",")
    for v in variants:
        if v != "fp32" and _parse(v)["kind"] not in ("nbits", "dq8"):
            raise SystemExit(f"unknown variant {v!r}")
    tmp = tempfile.TemporaryDirectory(prefix="quant-variants-") if a.work is None else None
    work = Path(tmp.name) if tmp else a.work
    result = {"variants": variants, "threads": a.threads, "rounds": a.rounds}
    if a.accuracy:
        result["accuracy"] = accuracy(a.accuracy.split(","), variants, work)
    if a.speed:
        paths = {v: make_variant(a.speed, v, work / "speed") for v in variants}
        runs = {v: [] for v in ["ceiling"] + variants}
        for r in range(a.rounds):
            for v in runs:
                print(f"round {r + 1}/{a.rounds}: {v}", file=sys.stderr, flush=True)
                if v == "ceiling":
                    runs[v].append(run(CEILING, a.speed, a.threads, HERE, a.batches, threads=a.threads))
                else:
                    runs[v].append(run(SPEED, paths[v], a.threads, a.tokens, a.batches, threads=a.threads))
        result["speed"] = runs
        from bench_ceiling import step_weight_bytes

        step_bytes = {v: step_weight_bytes(p)["bytes"] for v, p in paths.items()}
        step_bytes["ceiling"] = step_bytes.get("fp32", step_weight_bytes(a.speed)["bytes"])
        result["step_bytes"] = step_bytes
        med = {v: {b: float(np.median([x[b] for x in runs[v]])) for b in a.batches.split(",")} for v in runs}
        print(
            f"decode, {a.rounds} interleaved rounds, median tok/s (min-max). Batch 1 is bound by memory: GB/s = "
            "tok/s x the bytes one step reads, against the ceiling op's GB/s. Batch 32: the fraction of the "
            "ceiling op at batch 32 (float32 Gemm over the fp32 bytes)."
        )
        for v in runs:
            cells = []
            for b in a.batches.split(","):
                xs = sorted(x[b] for x in runs[v])
                cell = f"B={b}: {med[v][b]:7.1f} ({xs[0]:.1f}-{xs[-1]:.1f})"
                if b == "1":
                    gbps = med[v][b] * step_bytes[v] / 1e9
                    cell += f" {step_bytes[v] / 1e6:4.0f} MB/token {gbps:5.1f} GB/s = {gbps / (med['ceiling'][b] * step_bytes['ceiling'] / 1e9):.2f}"
                else:
                    cell += f" = {med[v][b] / med['ceiling'][b]:.2f}, {med[v][b] / med[v]['1']:.1f}x batch 1"
                cells.append(cell)
            print(f"{v:20}" + "   ".join(cells))
    if a.accuracy:
        print("cross-entropy change against the float32 reference on the held-out text (%):")
        print(f"{'':22}" + "".join(f"{n:>10}" for n in result["accuracy"]))
        for v in variants:
            print(
                f"{v:22}"
                + "".join(f"{100 * result['accuracy'][n][v]['ce_change']:>+10.2f}" for n in result["accuracy"])
            )
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
