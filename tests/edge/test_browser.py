"""The JavaScript runtime in a real browser: Debian's chromium, headless, driven by playwright-core.

A site is built with ``rwkv-export web`` (the v4 and v7 reference exports, and the default model's
export for the demo page) and served by the bundle's own ``serve.py`` (loopback, COOP/COEP). The check
page (js/browser/) runs the Node checks on WASM with 1 and 2 threads and on WebGPU (SwiftShader):
per-step logits vs the Python runtime, prefill = stepping, a saved state reloaded, greedy generation
equal to Python's. The demo page streams a continuation; its screenshot is kept in pytest's tmp folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import JS, REPO, node_ready

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WASM_TOL = 1e-5  # WASM computes as ORT's CPU provider does
WEBGPU_TOL = 1e-5  # GPU kernels (SwiftShader) sum in other orders; measured up to 4.8e-6


def browser_ready() -> str | None:
    why = node_ready()
    if why:
        return why
    if not Path(CHROMIUM).is_file():
        return "chromium is not installed (apt-get install chromium; scripts/ci_edge_setup.sh)"
    if not (JS / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is missing from js/node_modules (npm ci in js/)"
    return None


class Server:
    """serve.py of a bundle, on a free loopback port, stopped by the test (and by its own time limit)."""

    def __init__(self, root: Path, max_seconds: int = 900):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(root / "runtime" / "serve.py"),
                "--port",
                "0",
                "--dir",
                str(root),
                "--max-seconds",
                str(max_seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("serving"), line
        self.url = line.split(" at ")[1].strip()

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def site(edge_fixtures, tmp_path_factory):
    why = browser_ready()
    if why:
        pytest.skip(why)
    from rwkv_export.export import ExportOptions, export
    from rwkv_export.targets.web import write_web_bundle

    root = tmp_path_factory.mktemp("site")
    # v4, v7 and v4 with external data (not the state-tuned v6: WebGPU on SwiftShader is slow)
    cases = json.loads((edge_fixtures / "cases.json").read_text())["models"][:3]
    browser_cases = []
    for i, c in enumerate(cases):
        sub = "runtime" if i == 0 else f"m{i}"
        if i == 0:
            write_web_bundle(c["model"], root / sub)  # the runtime + ORT Web the check page imports
        else:  # other models: just their graphs beside it
            (root / sub).mkdir()
            from rwkv_export.targets.web import external_files

            for f in [Path(c["model"]), *Path(c["model"]).parent.glob(Path(c["model"]).stem + ".seq.onnx")]:
                for name in [f.name, *external_files(f)]:
                    shutil.copy(f.with_name(name), root / sub / name)
        keep = ("name", "prompt", "step_logits", "greedy", "after_state_token", "after_state_logits")
        browser_cases.append({**{k: c[k] for k in keep}, "url": f"./{sub}/{Path(c['model']).name}"})
    (root / "browser-cases.json").write_text(json.dumps(browser_cases))
    for f in ("check.html", "check.js"):
        shutil.copy(JS / "browser" / f, root / f)
    default = export(
        REPO / "exporter" / "default_model" / "tiny-rwkv4-pystdlib.pth", root.parent / "default.onnx", ExportOptions()
    )
    write_web_bundle(default[0], root / "demo")
    server = Server(root)
    yield root, server.url
    server.close()


def run_browser(jobs: list, tmp_path: Path) -> list:
    cfg = tmp_path / "browser.json"
    cfg.write_text(json.dumps({"chromium": CHROMIUM, "jobs": jobs}))
    p = subprocess.run(["node", "browser/run.mjs", str(cfg)], cwd=JS, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checks(site, tmp_path_factory):
    root, url = site
    jobs = [
        {"url": f"{url}check.html?backend=wasm&threads=1", "wait": "window.checkResult"},
        {"url": f"{url}check.html?backend=wasm&threads=2", "wait": "window.checkResult"},
        {"url": f"{url}check.html?backend=webgpu", "wait": "window.checkResult", "webgpu": True, "timeoutMs": 600_000},
    ]  # SwiftShader compiles every shader on the CPU: minutes on a busy machine
    return run_browser(jobs, tmp_path_factory.mktemp("browser"))


@pytest.mark.parametrize("job, threads", [(0, 1), (1, 2)])
def test_wasm_matches_python(checks, job, threads):
    r = checks[job]
    assert "error" not in r and "error" not in r["result"], r
    res = r["result"]
    assert res["isolated"] is True  # COOP/COEP from serve.py: SharedArrayBuffer, so threads are possible
    assert res["numThreads"] == threads
    for m in res["models"]:
        assert m["graphs"] == ["step", "sequence"]
        assert m["stepMaxDiff"] <= WASM_TOL, m
        assert m["prefillMaxDiff"] <= WASM_TOL, m
        assert m["reloadMaxDiff"] <= WASM_TOL, m
        assert m["greedyEqual"], m
        assert m["concurrentEqual"], m  # overlapping generate() calls: queued runs, both right
        assert m["stateLocation"] == "cpu"
        print(
            f"WASM {threads} thread(s) {m['name']}: max |JS - Python| step {m['stepMaxDiff']:.2e}, prefill {m['prefillMaxDiff']:.2e}"
        )


def test_webgpu_matches_python_with_state_on_gpu(checks):
    r = checks[2]
    assert "error" not in r and "error" not in r["result"], r
    for m in r["result"]["models"]:
        assert m["stateLocation"] == "gpu-buffer", m  # the state never came back to the CPU between steps
        assert m["stepMaxDiff"] <= WEBGPU_TOL, m
        assert m["prefillMaxDiff"] <= WEBGPU_TOL, m
        assert m["reloadMaxDiff"] <= WEBGPU_TOL, m
        assert m["greedyEqual"], m
        assert m["concurrentEqual"], m  # overlapping generate() calls: queued runs, both right
        print(f"WebGPU {m['name']}: max |JS - Python| step {m['stepMaxDiff']:.2e}, prefill {m['prefillMaxDiff']:.2e}")


def test_demo_page_streams_text(site, tmp_path):
    """The demo page loads the default model's bundle, continues a typed prompt, shows speed and backend."""
    root, url = site
    shot = tmp_path / "demo.png"
    prompt = "class Queue:\n    def "  # the default model was trained on Python's standard library
    [r] = run_browser(
        [
            {
                "url": f"{url}demo/index.html?backend=wasm&threads=2",
                "type": prompt,
                "screenshot": str(shot),
                "wait": f"window.demo.error || (window.demo.last && window.demo.last.prompt === {json.dumps(prompt)} && window.demo.last)",
                "evaluate": "({backend: document.getElementById('backend').textContent, "
                "speed: document.getElementById('speed').textContent, "
                "out: document.getElementById('out').textContent})",
            }
        ],
        tmp_path,
    )
    assert "error" not in r, r
    assert r["result"].get("text"), r
    assert r["extra"]["backend"] == "WASM, 2 threads"
    assert r["extra"]["speed"].endswith("tokens/s")
    assert r["extra"]["out"] == prompt + r["result"]["text"]
    # the page's greedy continuation is the Python runtime's
    from rwkv_runtime import Session

    py = Session(root / "demo" / "default.onnx")
    want = "".join(py.generate(prompt, r["result"]["stats"]["newTokens"], temperature=0))
    assert r["result"]["text"] == want
    assert shot.stat().st_size > 5000
    print(f"demo screenshot: {shot}")
