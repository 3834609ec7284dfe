"""Streaming export of bf16/fp16 and .safetensors checkpoints, and int8 quantisation in column slabs
(issue 18). A checkpoint that is not float32 stays in its own dtype, memory-mapped; each large matrix
is converted when it is written and then dropped, so the export never holds a float32 copy of the
model, and what it writes is byte for byte what exporting the float32-converted checkpoint writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "scripts" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- quantisation in column slabs -----------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("K", [256, 100])  # 100: the last block of each column padded
def test_slab_quantisation_is_byte_identical_to_one_shot(bits, K):
    from rwkv_export.onnx_graph import LazyArray
    from rwkv_export.quantize import Quantizer

    q = Quantizer(bits, 32)
    src = torch.randn(1000, K, generator=torch.Generator().manual_seed(bits + K))  # [out, in]
    w = np.ascontiguousarray(src.numpy().T)  # [K, N] as the MatMul reads it
    packed, scales, _ = q._q.qbits_block_quant(w)  # the whole matrix at once
    for slab in (4 * K * 37, 4 * K * 1000, 1):  # 37 columns a slab, all at once, one column a slab
        p, s = q.quantize(src.numpy().T, slab_bytes=slab)  # a transposed view, as export_weights gives
        assert p.dtype == packed.dtype and s.dtype == scales.dtype
        assert p.tobytes() == packed.tobytes() and s.tobytes() == scales.tobytes()
    # a bf16 matrix, read lazily: the same bytes as quantising its float32 conversion
    b = src.bfloat16()
    ref = q._q.qbits_block_quant(np.ascontiguousarray(b.float().numpy().T))
    p, s = q.quantize(LazyArray.of(b).T, slab_bytes=4 * K * 64)
    assert p.tobytes() == ref[0].tobytes() and s.tobytes() == ref[1].tobytes()


def test_lazy_array_computes_what_the_eager_conversion_does():
    import ml_dtypes

    from rwkv_export.onnx_graph import CHUNK_BYTES, LazyArray

    t = torch.randn(CHUNK_BYTES // (4 * 96) + 333, 96).to(torch.bfloat16)  # several chunks, a partial one
    eager = t.float().numpy()
    lazy = LazyArray.of(t)
    assert lazy.shape == eager.shape and lazy.T.shape == eager.T.shape and lazy.ndim == 2
    assert lazy.nbytes == eager.nbytes and lazy.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(lazy), eager)
    m = lazy.T.materialize()
    assert m.flags.c_contiguous and np.array_equal(m, eager.T)
    assert np.array_equal(np.asarray(lazy.T / 4.0), eager.T / np.float32(4.0))
    for dt in (np.float16, ml_dtypes.bfloat16):
        assert lazy.astype(dt).materialize().tobytes() == eager.astype(dt).tobytes()
        assert lazy.astype(dt).dtype == dt and lazy.astype(dt).nbytes == eager.size * 2
        assert lazy.T.astype(dt).materialize().tobytes() == np.ascontiguousarray(eager.T).astype(dt).tobytes()
        assert b"".join(c.tobytes() for c in lazy.astype(dt).chunks()) == eager.astype(dt).tobytes()
    assert b"".join(c.tobytes() for c in lazy.chunks()) == eager.tobytes()
    assert np.array_equal(lazy.T.columns(5, 17), eager.T[:, 5:17])


def test_weight_store_writes_a_lazy_array_in_chunks_and_once(tmp_path):
    """Streamed into the file chunk by chunk: the same offsets and bytes as writing the array itself;
    the other graph's request for the same LazyArray, or a LazyArray whose bytes are already stored,
    points at the stored bytes."""
    import onnx

    from rwkv_export.onnx_graph import CHUNK_BYTES, LazyArray, WeightStore

    t = torch.randn(CHUNK_BYTES // (4 * 64) + 77, 64).to(torch.float16)
    eager = t.float().numpy()
    st = WeightStore(tmp_path / "w.data")
    calls = []
    st.after_write = lambda s: calls.append(s.processed)
    small = st.add("v", np.arange(10, dtype=np.float32))
    a = st.add("a", LazyArray.of(t))
    assert len(calls) >= 3  # after every chunk (the export releases checkpoint pages there)
    b = st.add("b", LazyArray.of(t).T.T)  # another object, the same computation: not recomputed
    c = st.add("c", LazyArray.of(t))  # another source, the same bytes: written, then cut off again
    end = st.size
    d = st.add("d", eager)  # the plain array: the same bytes again
    e = st.add("e", LazyArray.of(t) / 2)
    st.close()
    info = {x.name: {e.key: e.value for e in x.external_data} for x in (small, a, b, c, d, e)}
    assert info["a"]["offset"] == info["b"]["offset"] == info["c"]["offset"] == info["d"]["offset"]
    assert int(info["a"]["offset"]) % 65536 == 0 and end == int(info["a"]["offset"]) + eager.nbytes
    assert a.data_type == onnx.TensorProto.FLOAT and list(a.dims) == list(eager.shape)
    raw = (tmp_path / "w.data").read_bytes()
    off = int(info["a"]["offset"])
    assert raw[off : off + eager.nbytes] == eager.tobytes()
    off = int(info["e"]["offset"])
    assert off >= end and raw[off:] == (eager / np.float32(2)).tobytes()


# -- tiny models of every version, every large-matrix path forced lazy (in process) ------------------
@pytest.mark.parametrize(
    "name,opts",
    [
        ("golden-rwkv4", {"precision": "fp16"}),  # RWKV-4 fp16: the matrices rescaled (divided)
        ("golden-rwkv5.2", {"precision": "bf16"}),
        ("golden-rwkv6", {"quantize": "int8"}),
        ("golden-rwkv7", {}),
        ("golden-rwkv7", {"quantize": "int4"}),
    ],
)
def test_bf16_checkpoint_exports_the_bytes_of_its_float32_conversion(tmp_path, monkeypatch, name, opts):
    from rwkv_export import checkpoint
    from rwkv_export.export import ExportOptions, export

    from ..conftest import ref_model

    w = torch.load(ref_model(name), weights_only=True)
    bf = {k: v.to(torch.bfloat16) for k, v in w.items()}
    torch.save(bf, tmp_path / "bf16.pth")
    torch.save({k: v.float() for k, v in bf.items()}, tmp_path / "fp32.pth")
    monkeypatch.setattr(checkpoint, "STREAM_MIN_ELEMENTS", 1)  # every 2-D tensor stays bf16
    ck = checkpoint.load_checkpoint(tmp_path / "bf16.pth", stream=True)
    assert any(v.dtype == torch.bfloat16 for v in ck.weights.values())
    outs = {}
    for src in ("bf16", "fp32"):
        (tmp_path / src).mkdir()
        outs[src] = export(
            tmp_path / f"{src}.pth", tmp_path / src / "m.onnx", ExportOptions(external_data=True, **opts)
        )[0]
    a, b = (p.with_name("m.onnx.data").read_bytes() for p in outs.values())
    assert a == b
    import onnx

    for g in ("m.onnx", "m.seq.onnx"):
        ga, gb = (onnx.load(str(tmp_path / s / g), load_external_data=False).graph for s in ("bf16", "fp32"))
        assert [str(t) for t in ga.initializer] == [str(t) for t in gb.initializer]


def test_stream_leaves_the_reference_path_float32(tmp_path, monkeypatch):
    """Without ``stream`` (the reference model, validate) every tensor is float32 as before."""
    from rwkv_export import checkpoint

    from ..conftest import ref_model

    torch.save(
        {k: v.half() for k, v in torch.load(ref_model("golden-rwkv7"), weights_only=True).items()}, tmp_path / "h.pth"
    )
    monkeypatch.setattr(checkpoint, "STREAM_MIN_ELEMENTS", 1)
    assert {v.dtype for v in checkpoint.load_checkpoint(tmp_path / "h.pth").weights.values()} == {torch.float32}
    streamed = checkpoint.load_checkpoint(tmp_path / "h.pth", stream=True).weights
    assert torch.float16 in {v.dtype for v in streamed.values()}
    assert all(v.dtype == torch.float32 for v in streamed.values() if v.ndim != 2)


# -- ~100-200 MB checkpoints, each export in a fresh process (its own peak RSS) -------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One random RWKV-7 (3 x 1024, ffn 4096, vocab 4096: 176 MB as float32) as bf16 .pth, bf16 and
    fp32 .safetensors, and the float32 conversion .pth every export is compared with."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("stream")
    bench = _bench_scale()
    bench.random_rwkv7(d / "orig.pth", n_layer=3, n_embd=1024, ffn=4096, vocab=4096)
    w = {k: v.to(torch.bfloat16) for k, v in torch.load(d / "orig.pth", weights_only=True).items()}
    (d / "orig.pth").unlink()
    torch.save(w, d / "bf16.pth")
    save_file({k: v.contiguous() for k, v in w.items()}, str(d / "bf16.safetensors"))
    w32 = {k: v.float().contiguous() for k, v in w.items()}
    torch.save(w32, d / "fp32.pth")
    save_file(w32, str(d / "fp32.safetensors"))
    # not synced: a checkpoint written moments ago (dirty page cache) must be released as well
    return d, sum(v.numel() * 4 for v in w32.values())


def _export(bench, ck: Path, out: Path, opts: dict) -> dict:
    out.parent.mkdir()
    return bench._child(bench._EXPORT, ck, out, json.dumps({"external_data": True, **opts}))


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory):
    """The float32-converted checkpoint exported (fp32, int8): what every streamed export must write."""
    d, _ = checkpoints
    bench, out = _bench_scale(), tmp_path_factory.mktemp("ref")
    return {
        kind: (_export(bench, d / "fp32.pth", out / kind / "m.onnx", opts), out / kind / "m.onnx.data")
        for kind, opts in (("fp32", {}), ("int8", {"quantize": "int8"}))
    }


@pytest.mark.parametrize("src", ["bf16.pth", "bf16.safetensors", "fp32.safetensors"])
def test_large_checkpoint_streams_and_writes_the_float32_bytes(checkpoints, reference, tmp_path, src):
    d, fp32_bytes = checkpoints
    ref, ref_data = reference["fp32"]
    r = _export(_bench_scale(), d / src, tmp_path / "new" / "m.onnx", {})
    assert (tmp_path / "new" / "m.onnx.data").read_bytes() == ref_data.read_bytes()
    # Loading it whole as float32 (as before) alone grew the process by 1x the model; streamed, the
    # export holds one matrix at a time and the mapped pages it has not yet released.
    grown = (r["export_peak_rss_mb"] - r["export_baseline_rss_mb"]) * 2**20
    assert grown < 0.6 * fp32_bytes, (r, fp32_bytes)
    assert grown < 1.5 * (ref["export_peak_rss_mb"] - ref["export_baseline_rss_mb"]) * 2**20 + 32 * 2**20


def test_large_bf16_checkpoint_quantised_streams(checkpoints, reference, tmp_path):
    d, fp32_bytes = checkpoints
    r = _export(_bench_scale(), d / "bf16.pth", tmp_path / "new" / "m.onnx", {"quantize": "int8"})
    data = tmp_path / "new" / "m.onnx.data"
    assert data.read_bytes() == reference["int8"][1].read_bytes()
    # streamed: one matrix at a time in float32 while it is quantised, never the model (the int8 file is
    # now ~1/4 of it with the embedding quantised too, so the bound is the float32 model's, as above)
    grown = (r["export_peak_rss_mb"] - r["export_baseline_rss_mb"]) * 2**20
    assert grown < 0.6 * fp32_bytes, (r, fp32_bytes)


def test_safetensors_errors_stay_one_line(tmp_path):
    from safetensors.torch import save_file

    from rwkv_export.checkpoint import load_checkpoint
    from rwkv_export.errors import CheckpointError

    p = tmp_path / "m.safetensors"
    save_file({"emb.weight": torch.zeros(64, 16, dtype=torch.bfloat16)}, str(p))
    good = p.read_bytes()
    for bad in (good[:-10], good[:6], b"\xff" * 40):
        p.write_bytes(bad)
        with pytest.raises(CheckpointError, match="truncated or corrupt safetensors file"):
            load_checkpoint(p, stream=True)
