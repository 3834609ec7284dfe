"""rwkv-runtime as web developers get it: the `npm pack` tarball of js/ (not the source tree) installed
into fresh app folders outside the repository. In Node with onnxruntime-node beside it, it gives the
Python runtime's greedy generation and continues a chat from the generation's own state; without
onnxruntime-node it is one error naming the package to install; an esbuild app bundles it with
onnxruntime-web and runs in headless chromium with ORT Web's files served as js/README.md says. The
declarations (index.d.ts) type-check a typed usage example (tsc --noEmit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .conftest import JS, REPO

pytestmark = pytest.mark.slow
ORT_VERSION = "1.30.0"
PROMPT = "class Queue:\n    def "  # the default model was trained on Python's standard library
NPM_ENV = {
    **os.environ,
    "ONNXRUNTIME_NODE_INSTALL": "skip",
    "npm_config_fund": "false",
    "npm_config_audit": "false",
    "npm_config_update_notifier": "false",
}


def _need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed")


def _npm(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(
        ["npm", *args, "--prefer-offline", "--loglevel=error"],
        cwd=cwd,
        env=NPM_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0 and ("ENOTFOUND" in r.stderr or "EAI_AGAIN" in r.stderr or "ETIMEDOUT" in r.stderr):
        pytest.skip("the npm registry is not reachable (and the packages are not in npm's cache)")
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    _need("node", "npm")
    d = tmp_path_factory.mktemp("pack")
    r = subprocess.run(
        ["npm", "pack", "--json", "--pack-destination", str(d)],
        cwd=JS,
        env=NPM_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)[0]
    files = {f["path"] for f in info["files"]}
    assert "src/node.js" in files and "src/index.d.ts" in files and "README.md" in files
    assert not any(f.startswith(("test/", "node_modules/", "browser/", "bench/")) for f in files), sorted(files)
    return d / info["filename"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from rwkv_export import DEFAULT_MODEL
    from rwkv_export.export import ExportOptions, export

    d = tmp_path_factory.mktemp("pkg-model")
    return export(DEFAULT_MODEL, d / "m.onnx", ExportOptions())[0]


def _app(root: Path, name: str) -> Path:
    app = root / name
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": name, "private": True, "type": "module"}))
    return app


NODE_APP = """
import { Session, RuntimeUserError } from "rwkv-runtime";
const [model, prompt] = [process.argv[2], process.argv[3]];
try {
  const s = await Session.create(model);
  const gen = s.generate(prompt, { temperature: 0, maxNewTokens: 24 });
  let text = "";
  for await (const piece of gen) text += piece;
  const next = await s.step([10], gen.state);  // continue from this generation's own state
  console.log(JSON.stringify({ text, stats: gen.stats, logits: Array.from(next.logits[0]) }));
} catch (e) {
  if (!(e instanceof RuntimeUserError)) throw e;
  console.error(`Error: ${e.message}`);
  process.exit(1);
}
"""


def test_packed_package_runs_in_node_app(tarball, model, tmp_path):
    """npm install <tarball> onnxruntime-node in a fresh folder: Python's greedy text and continuation."""
    app = _app(tmp_path, "node-app")
    _npm(["install", str(tarball), f"onnxruntime-node@{ORT_VERSION}"], app)
    assert not (app / "node_modules" / "rwkv-runtime").is_symlink()  # a copy from the tarball, not the source
    (app / "main.mjs").write_text(NODE_APP)
    r = subprocess.run(["node", "main.mjs", str(model), PROMPT], cwd=app, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    from rwkv_runtime import Session

    s = Session(model)
    gen = s.generate(PROMPT, 24, temperature=0)
    assert got["text"] == "".join(gen)
    after, _ = s.step(np.array([10]), gen.state)
    assert np.abs(np.array(got["logits"]) - after[0]).max() <= 1e-5


def test_missing_peer_is_one_error_naming_it(tarball, model, tmp_path):
    """Without onnxruntime-node (an optional peer, so npm does not install it): our one error line."""
    app = _app(tmp_path, "bare-app")
    _npm(["install", str(tarball)], app)
    assert not (app / "node_modules" / "onnxruntime-node").exists()
    (app / "main.mjs").write_text(NODE_APP)
    r = subprocess.run(["node", "main.mjs", str(model), PROMPT], cwd=app, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "Error: onnxruntime-node is not installed: rwkv-runtime runs models on it (a peer dependency); install it "
        "beside rwkv-runtime (npm install onnxruntime-node), or pass it as options.ort"
    ], r.stderr  # was: Cannot find package


def test_declarations_type_check_a_typed_app():
    """tsc --noEmit on js/test/types/usage.ts: the API types accept real use and refuse misuse."""
    tsc = JS / "node_modules" / ".bin" / "tsc"
    if not tsc.is_file():
        pytest.skip("typescript is missing from js/node_modules (npm ci in js/)")
    r = subprocess.run([str(tsc), "-p", "test/types"], cwd=JS, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


BROWSER_APP = """
import { Session } from "rwkv-runtime/web";
const prompt = %s;
try {
  // ORT Web's .wasm/.mjs files are served from ./ort/ (copied from node_modules/onnxruntime-web/dist)
  const s = await Session.create("./m.onnx", { backend: "wasm", threads: 1, wasmPaths: "./ort/" });
  const gen = s.generate(prompt, { temperature: 0, maxNewTokens: 24 });
  let text = "";
  for await (const piece of gen) text += piece;
  const next = await s.step([10], gen.state);
  window.appResult = { text, graphs: s.graphs, logits: Array.from(next.logits[0]) };
} catch (e) {
  window.appResult = { error: String(e.message ?? e) };
}
"""


def test_packed_package_bundles_and_runs_in_browser(tarball, model, tmp_path):
    """An esbuild app with rwkv-runtime/web + onnxruntime-web, in headless chromium (WASM)."""
    from .test_browser import CHROMIUM, Server, browser_ready

    why = browser_ready()
    if why:
        pytest.skip(why)
    app = _app(tmp_path, "web-app")
    _npm(["install", str(tarball), f"onnxruntime-web@{ORT_VERSION}", "esbuild@0.28"], app)
    (app / "main.js").write_text(BROWSER_APP % json.dumps(PROMPT))
    dist = app / "dist"
    (dist / "ort").mkdir(parents=True)
    r = subprocess.run(
        [
            str(app / "node_modules" / ".bin" / "esbuild"),
            "main.js",
            "--bundle",
            "--format=esm",
            "--outfile=dist/app.js",
            "--log-level=error",
        ],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ort_dist = app / "node_modules" / "onnxruntime-web" / "dist"
    for f in ort_dist.glob("ort-wasm-simd-threaded*"):
        if f.suffix in (".wasm", ".mjs"):
            shutil.copy(f, dist / "ort" / f.name)
    (dist / "index.html").write_text(
        '<!doctype html><meta charset="utf-8"><script type="module" src="app.js"></script>'
    )
    for f in model.parent.glob("m*.onnx*"):  # the graphs and their shared weights file (m.onnx.data)
        shutil.copy(f, dist / f.name)
    shutil.copy(REPO / "deploy_examples" / "web" / "serve.py", dist / "serve.py")
    (dist / "runtime").mkdir()  # Server runs root/runtime/serve.py
    shutil.copy(dist / "serve.py", dist / "runtime" / "serve.py")
    server = Server(dist, max_seconds=600)
    try:
        cfg = tmp_path / "browser.json"
        cfg.write_text(
            json.dumps(
                {
                    "chromium": CHROMIUM,
                    "jobs": [{"url": f"{server.url}index.html", "wait": "window.appResult", "timeoutMs": 300_000}],
                }
            )
        )
        p = subprocess.run(["node", "browser/run.mjs", str(cfg)], cwd=JS, capture_output=True, text=True, timeout=600)
    finally:
        server.close()
    assert p.returncode == 0, p.stderr[-3000:]
    [res] = json.loads(p.stdout.strip().splitlines()[-1])
    assert "error" not in res and "error" not in res["result"], res
    from rwkv_runtime import Session

    s = Session(model)
    gen = s.generate(PROMPT, 24, temperature=0)
    assert res["result"]["text"] == "".join(gen)
    assert res["result"]["graphs"] == ["step", "sequence"]
    after, _ = s.step(np.array([10]), gen.state)
    assert np.abs(np.array(res["result"]["logits"]) - after[0]).max() <= 1e-5
