"""Run a real ``tritonserver`` from the ``nvidia-pytriton`` wheel on this machine (CPU is enough).

The wheel bundles Triton's server binary (2.51), its shared libraries (``nvidia_pytriton.libs``) and the
Python backend, with one backend stub per Python version. What this launcher sets up, and why:

- a backend folder with ``libtriton_python.so`` and the stub built for *this* interpreter's version;
- ``LD_LIBRARY_PATH`` += the wheel's libraries (the server links against them);
- ``PATH`` starting with the model environment's ``bin/``: the stub embeds libpython and finds its
  ``python3`` on PATH, so that virtualenv's ``pyvenv.cfg`` applies and its site-packages (numpy,
  rwkv_runtime) are importable inside ``model.py`` (pytriton's own launcher does the same). That env needs
  numpy<2 (this stub returns empty outputs with numpy 2) and the Python minor version of a bundled stub:
  ``make_stub_env.sh`` builds one (default ``build/triton-env``; ``RWKV_TRITON_PYTHON_ENV`` or
  ``python_env=`` choose another);
- HTTP and gRPC on 127.0.0.1 only, on free ports; metrics off; a lifetime bound after which it is killed.

    deploy_examples/triton/make_stub_env.sh                       # once: build/triton-env
    python deploy_examples/triton/local_server.py REPO            # serve until Ctrl-C (prints the ports)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

DEFAULT_ENV = Path(__file__).resolve().parents[2] / "build" / "triton-env"


def _pytriton_dist(python_env: Path) -> tuple[Path, Path]:
    """The server files of the nvidia-pytriton wheel: in the model env (make_stub_env.sh puts it there),
    else in this interpreter's environment. Located, never imported (its package imports much more)."""
    code = "import importlib.util as u; s = u.find_spec('pytriton'); print(s.origin if s else '')"
    r = subprocess.run([str(python_env / "bin" / "python3"), "-c", code], capture_output=True, text=True, timeout=60)
    origin = r.stdout.strip() if r.returncode == 0 else ""
    if not origin:
        spec = importlib.util.find_spec("pytriton")
        origin = spec.origin if spec else ""
    if not origin:
        raise RuntimeError(
            f"no tritonserver: the nvidia-pytriton wheel is in neither {python_env} nor this "
            "environment (deploy_examples/triton/make_stub_env.sh installs it)"
        )
    root = Path(origin).resolve().parent
    return root / "tritonserver", root.parent / "nvidia_pytriton.libs"


def _die_with_parent():
    """In the child before exec: Linux sends it SIGTERM when the launcher dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTriton:
    """``with LocalTriton(repo) as t: t.http_url ...`` — a tritonserver process with a bounded lifetime."""

    def __init__(self, repo, start_timeout: float = 120.0, max_lifetime: float = 900.0, extra_args=(), python_env=None):
        self.repo = Path(repo).resolve()
        # the environment model.py runs in (its bin/ goes first on PATH); default: this interpreter's
        self.python_env = Path(python_env or os.environ.get("RWKV_TRITON_PYTHON_ENV") or DEFAULT_ENV)
        self.start_timeout, self.max_lifetime = start_timeout, max_lifetime
        self.extra_args = list(extra_args)
        self.proc = None
        self._work = None

    def _probe_env(self) -> str:
        """The env's Python version (it picks the stub); refuses numpy 2, which this stub cannot read."""
        py = self.python_env / "bin" / "python3"
        if not py.exists():
            raise RuntimeError(f"{self.python_env}: no bin/python3 (not a Python environment)")
        code = "import sys, numpy; print('%d.%d' % sys.version_info[:2], numpy.__version__)"
        r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{py}: cannot import numpy ({r.stderr.strip().splitlines()[-1:]})")
        ver, np_ver = r.stdout.split()
        if int(np_ver.split(".")[0]) >= 2:
            # the stub in nvidia-pytriton 0.7 (Triton 2.51) returns EMPTY output tensors with numpy 2
            raise RuntimeError(
                f"{self.python_env} has numpy {np_ver}: Triton 2.51's Python backend stub needs "
                "numpy<2 (run deploy_examples/triton/make_stub_env.sh)"
            )
        return ver

    def _backends(self, dist: Path) -> Path:
        ver = self._probe_env()
        stub = dist / "python_backend_stubs" / ver / "triton_python_backend_stub"
        if not stub.is_file():
            raise RuntimeError(f"the pytriton wheel has no Python backend stub for Python {ver}")
        py = Path(self._work) / "backends" / "python"
        py.mkdir(parents=True)
        for f in (dist / "backends" / "python").iterdir():
            if f.is_file():
                (py / f.name).symlink_to(f)
        shutil.copy2(stub, py / "triton_python_backend_stub")
        return py.parent

    def __enter__(self) -> LocalTriton:
        if not (self.python_env / "bin" / "python3").exists():
            raise RuntimeError(f"{self.python_env}: no bin/python3 (run deploy_examples/triton/make_stub_env.sh)")
        dist, libs = _pytriton_dist(self.python_env)
        self._work = tempfile.mkdtemp(prefix="rwkv-triton-")
        try:
            backends = self._backends(dist)
        except BaseException:
            shutil.rmtree(self._work, ignore_errors=True)
            raise
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (env.get("LD_LIBRARY_PATH"), str(libs)) if p)
        env["PATH"] = f"{self.python_env / 'bin'}:{env.get('PATH', '')}"
        self.http_port, self.grpc_port = _free_port(), _free_port()
        cmd = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--exit-timeout-secs=5",
            "--strict-readiness=true",
            *self.extra_args,
        ]
        self.log_path = Path(self._work) / "tritonserver.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._killer = threading.Timer(self.max_lifetime, self._stop)
        self._killer.daemon = True
        self._killer.start()
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)  # stop it and remove the work folder (its log is in the message)
            raise
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with status {self.proc.returncode}:\n{self.errors()}")
            if self.ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"tritonserver was not ready after {self.start_timeout:.0f} s:\n{self.errors()}")

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def errors(self) -> str:
        """The server's error lines (model load failures first), without the CPU-only machine's CUDA noise."""
        lines = self.log().splitlines()
        errs = [ln for ln in lines if ln.startswith("E") and "CudaDriverHelper" not in ln]
        return "\n".join(errs + lines[-1:])[-4000:]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __exit__(self, *exc):
        self._killer.cancel()
        self._stop()
        self._log.close()
        shutil.rmtree(self._work, ignore_errors=True)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo", type=Path)
    ap.add_argument("--python-env", type=Path, default=None, help="env model.py runs in (numpy<2, rwkv_runtime)")
    ap.add_argument("--lifetime", type=float, default=3600.0, help="seconds before the server is stopped")
    a = ap.parse_args(argv)
    if not a.repo.is_dir():
        print(f"Error: {a.repo}: no such model repository", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too (via __exit__)
    try:
        with LocalTriton(a.repo, max_lifetime=a.lifetime, python_env=a.python_env) as t:
            print(f"tritonserver ready: HTTP {t.http_url}  gRPC {t.grpc_url}  (Ctrl-C stops it)", flush=True)
            while t.proc.poll() is None:
                time.sleep(1)
    except RuntimeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
