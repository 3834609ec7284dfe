"""`rwkv-export export`'s progress bar ends at its total (it counted 2 + 2 per graph, so with --quantize,
one more stage per graph, it ran past it: 8/6); ExportOptions refuses bad combinations itself, with the
CLI's one-line errors."""

import pytest
from click.testing import CliRunner

import rwkv_export.cli as cli
from rwkv_export.errors import ExportError
from rwkv_export.export import ExportOptions


@pytest.mark.parametrize("extra", [[], ["--quantize", "int8"], ["--graphs", "step", "--quantize", "int8-dynamic"]])
def test_progress_bar_total_equals_its_final_count(rwkv4_ref, tmp_path, monkeypatch, extra):
    seen = []

    class Recorder(cli._Bar):
        def close(self):
            seen.append((self.bar.total, self.bar.n))  # n: the stages export() really reported
            super().close()

    monkeypatch.setattr(cli, "_Bar", Recorder)
    res = CliRunner().invoke(cli.main, ["export", str(rwkv4_ref), "-o", str(tmp_path / "m.onnx"), *extra])
    assert res.exit_code == 0, res.output
    ((total, n),) = seen
    assert n == total and n == 2 + (1 if "step" in extra else 2) * (3 if "--quantize" in extra else 2)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"quantize": "int8", "precision": "fp16"}, "--quantize applies to fp32 exports"),
        ({"graphs": ("step", "step")}, "--graphs names step more than once"),
        ({"graphs": ()}, "--graphs must name some of"),
        ({"quant_block": 64}, "--quant-block applies to --quantize int8 or int4"),
        ({"quantize": "int8", "quant_block": 48}, "--quant-block must be one of"),
        ({"wkv": "fast"}, "--wkv must be 'plain' or 'plugin'"),
        ({"precision": "fp8"}, "--precision must be one of"),
    ],
)
def test_export_options_check_themselves(kw, msg):
    with pytest.raises(ExportError, match=msg):
        ExportOptions(**kw)
    opts = ExportOptions()
    for k, v in kw.items():  # changed after construction: check() (export() calls it again) refuses it
        setattr(opts, k, v)
    with pytest.raises(ExportError, match=msg):
        opts.check()


def test_a_bad_combination_is_one_line_from_the_cli(rwkv4_ref, tmp_path):
    res = CliRunner().invoke(
        cli.main,
        ["export", str(rwkv4_ref), "-o", str(tmp_path / "m.onnx"), "--quantize", "int8", "--precision", "fp16"],
    )
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "Error: --quantize applies to fp32 exports (its int8/int4 formats are for ONNX Runtime on CPU)"
    ]
    assert list(tmp_path.iterdir()) == []
