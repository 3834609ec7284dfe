"""lm-evaluation-harness (its ``local-completions`` model, the server's own tokenizer through
``tokenizer_backend=remote``) against a real ``rwkv_runtime`` server on 127.0.0.1, on an offline task
defined from a local LAMBADA-format file: its perplexity and accuracy equal ``rwkv-export eval`` on the
same data (``--pad-token none``: lm-eval prepends no token to the context)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from .conftest import need_serve_deps

need_serve_deps()
pytest.importorskip("lm_eval", reason="lm-evaluation-harness (dev extra) is not installed")
pytest.importorskip("tenacity", reason="lm-eval's api extra is not installed")

pytestmark = pytest.mark.slow

DOCS = [  # Python, since the default model learnt Python's standard library
    "def __init__(self, name):\n        self.name = name",
    "for key, value in items.items():\n        result[key] = value",
    "import os\nimport sys\n\n\ndef main():\n    return sys",
    "    if not isinstance(value, str):\n        raise TypeError",
    "with open(path) as f:\n    data = f.read()\n    return data",
    "        for i in range(len(self)):\n            yield self[i]",
    "    return self",
]

TASK = """task: lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_local_completions_equals_eval(default_model, make_server, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lambada_local.yaml").write_text(TASK.format(data=data), encoding="utf-8")
    srv = make_server(default_model, model_name="m")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "local-completions",
        "--model_args",
        f"model=m,base_url={srv.url}/v1/completions,tokenizer_backend=remote,num_concurrent=1,max_retries=1",
        "--tasks",
        "lambada_local",
        "--include_path",
        str(tasks),
        "--output_path",
        str(out),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (res_file,) = list(Path(out).rglob("results_*.json"))
    got = json.loads(res_file.read_text())["results"]["lambada_local"]

    from rwkv_export.cli import main

    e = CliRunner().invoke(
        main, ["eval", str(default_model), "--data", str(data), "--pad-token", "none", "--json", "-q"]
    )
    assert e.exit_code == 0, e.output
    want = json.loads(e.output)["export"]
    assert 0 < want["accuracy"] < 1  # the data discriminates
    assert got["perplexity,none"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert got["acc,none"] == pytest.approx(want["accuracy"], abs=1e-12)
