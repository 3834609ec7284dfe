"""Build and locate the TensorRT plugin libraries for the ``rwkv::WKV4..WKV7`` (+ ``Seq``) nodes.

The C++/CUDA sources live in ``plugins/`` at the repository root (see ``plugins/README.md``).
The compiler driver the package ships; the test-only builds (the CPU reference, the kernel emulator,
AddressSanitizer) live in plugins/tests/build_helpers.py on top of it. It imports neither torch nor
tensorrt, and it can be loaded by file path.

- :func:`build_plugin` -- cmake of ``librwkv_trt_plugins.so`` (for loadLibrary) and
  ``librwkv_trt_plugins_autoregister.so`` (for dlopen-only loaders) against TensorRT headers.
- :func:`find_plugin` -- ``$RWKV_TRT_PLUGIN``, else ``plugins/build/librwkv_trt_plugins.so``.
- :func:`compile_kernels` / :func:`compile_kernels_only` -- nvcc of the CUDA kernels alone (no TensorRT).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

try:
    from rwkv_runtime.errors import RuntimeUserError as _UserError
except ImportError:  # loaded by file path (plugins/tests/gpu_check.py) without the package installed
    _UserError = ValueError

PLUGIN_NAMESPACE = "rwkv"
PLUGIN_VERSION = "1"
OP_TYPES = ("WKV4", "WKV4Seq", "WKV5", "WKV5Seq", "WKV6", "WKV6Seq", "WKV7", "WKV7Seq")
LIBRARY_NAME = "librwkv_trt_plugins.so"  # for IPluginRegistry::loadLibrary (trtexec --dynamicPlugins)
AUTOREGISTER_LIBRARY_NAME = "librwkv_trt_plugins_autoregister.so"  # for ctypes / Polygraphy --plugins
KERNELS_LIBRARY_NAME = "librwkv_wkv4_kernels.so"
HOST_LIBRARY_NAME = "librwkv_wkv4_host.so"
# Per kernel family: source folder, kernel files, kernel library, CPU-build source and library.
FAMILIES = {
    "wkv4": ("wkv4", ("wkv4Kernel.cu",), KERNELS_LIBRARY_NAME, "wkv4Host.cpp", HOST_LIBRARY_NAME),
    "wkvhead": (
        "wkvhead",
        ("wkv5Kernel.cu", "wkv6Kernel.cu", "wkv7Kernel.cu"),
        "librwkv_wkvhead_kernels.so",
        "wkvHeadHost.cpp",
        "librwkv_wkvhead_host.so",
    ),
}
ENV_VAR = "RWKV_TRT_PLUGIN"
# SASS for each, plus PTX of the newest so later GPUs can JIT. CUDA 13 has no sm_70 or older.
DEFAULT_CUDA_ARCHITECTURES = (80, 86, 89, 90)

Archs = None | int | str | Iterable[int | str]


class PluginError(_UserError):
    """A problem with the TensorRT plugin library; the message is one line."""


class PluginBuildError(PluginError):
    """Compiling the plugin library or the kernels failed, or a tool is missing."""


class PluginNotFound(PluginError):
    """``$RWKV_TRT_PLUGIN`` names a file that does not exist."""


# -- locations ----------------------------------------------------------------------------------
def repo_root() -> Path:
    """The checkout this module belongs to (``exporter/targets/tensorrt/plugin.py`` is
    ``rwkv_export.targets.tensorrt.plugin``)."""
    return Path(__file__).resolve().parents[3]


def plugins_dir() -> Path:
    """``plugins/`` with the C++/CUDA sources; only present in a source checkout."""
    d = repo_root() / "plugins"
    if not (d / "CMakeLists.txt").is_file():
        raise PluginBuildError(f"plugin sources not found at {d}: building needs a source checkout of rwkv-export")
    return d


def default_plugin_path() -> Path:
    return repo_root() / "plugins" / "build" / LIBRARY_NAME


def find_plugin() -> Path | None:
    """Path of ``librwkv_trt_plugins.so``: ``$RWKV_TRT_PLUGIN`` if set, else the default build
    directory ``plugins/build/``; None if neither exists. A set but wrong ``$RWKV_TRT_PLUGIN`` raises
    :class:`PluginNotFound` rather than silently falling back to another library."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise PluginNotFound(f"{ENV_VAR}={env} does not exist")
        return p.resolve()
    p = default_plugin_path()
    return p if p.is_file() else None


def find_nvcc() -> str | None:
    """nvcc from ``$CUDACXX``, ``$CUDA_HOME``/``$CUDA_PATH``, ``PATH`` or /usr/local/cuda."""
    cands = [os.environ.get("CUDACXX")]
    cands += [str(Path(os.environ[v]) / "bin" / "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def cuda_include_dir(nvcc: str | None = None) -> Path | None:
    """A CUDA include directory with cuda_fp16.h, or None."""
    cands = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = nvcc or find_nvcc()
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent / "include")
        # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one)
        try:
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            m = re.search(r"(/\S+)/bin/nvcc", text)
            if m:
                cands.append(Path(m.group(1)) / "include")
        except OSError:
            pass
    cands.append(Path("/usr/local/cuda/include"))
    for c in cands:
        if (c / "cuda_fp16.h").is_file():
            return c
    return None


# -- helpers ------------------------------------------------------------------------------------
def _parse_archs(archs: Archs) -> list:
    if archs is None:
        return list(map(str, DEFAULT_CUDA_ARCHITECTURES))
    if isinstance(archs, (int, str)):
        archs = [a for a in re.split(r"[;, ]+", str(archs)) if a]
    out = []
    for a in archs:
        a = str(a).strip().lower().removeprefix("sm_").removeprefix("compute_")
        if not re.fullmatch(r"\d{2,3}[af]?", a):
            raise PluginBuildError(f"bad CUDA architecture {a!r} (expected e.g. 80, 86, 89, 90, 90a)")
        out.append(a)
    if not out:
        raise PluginBuildError("no CUDA architecture given")
    return out


def _gencode_flags(archs: Archs) -> list:
    parsed = _parse_archs(archs)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in parsed]
    newest = max(parsed, key=lambda a: int(re.match(r"\d+", a).group()))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _first_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\berror\b|fatal", ln, re.IGNORECASE):
            return ln[:400]
    return lines[-1][:400] if lines else "no output"


def _run(cmd: Sequence, what: str, log: Path | None = None, cwd: Path | None = None) -> str:
    cmd = [str(c) for c in cmd]
    try:
        proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise PluginBuildError(f"{what}: cannot run {cmd[0]}: {e}") from None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n" + proc.stdout + "\n")
    if proc.returncode != 0:
        where = f" (full log: {log})" if log is not None else ""
        raise PluginBuildError(f"{what} failed: {_first_error(proc.stdout)}{where}")
    return proc.stdout


# -- builds -------------------------------------------------------------------------------------
def build_plugin(tensorrt_root, build_dir=None, cuda_architectures: Archs = None) -> Path:
    """Configure and build ``librwkv_trt_plugins.so`` and, beside it,
    ``librwkv_trt_plugins_autoregister.so`` with CMake; returns the first one's path.

    ``tensorrt_root`` is a TensorRT SDK root, or directly its include directory (only the headers
    are needed: the library is not linked against libnvinfer). ``build_dir`` defaults to
    ``plugins/build`` (where :func:`find_plugin` looks). ``cuda_architectures`` e.g. ``"80;86;89;90"``
    (the default) or ``[90]``.
    Raises :class:`PluginBuildError` with one line on any failure; the full log is kept in
    ``<build_dir>/rwkv-plugin-build.log``.
    """
    src = plugins_dir()
    trt = Path(tensorrt_root).expanduser().resolve()
    if (trt / "include" / "NvInfer.h").is_file():
        include = trt / "include"
    elif (trt / "NvInfer.h").is_file():
        include = trt
    else:
        raise PluginBuildError(f"{trt / 'include' / 'NvInfer.h'} not found: pass the root of a TensorRT SDK")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise PluginBuildError("cmake not found on PATH (needs CMake >= 3.21)")
    nvcc = find_nvcc()
    if nvcc is None:
        raise PluginBuildError("nvcc not found (set CUDACXX or CUDA_HOME, or put the CUDA toolkit on PATH)")
    build = Path(build_dir).expanduser().resolve() if build_dir else src / "build"
    build.mkdir(parents=True, exist_ok=True)
    log = build / "rwkv-plugin-build.log"
    log.write_text("")
    cfg = [
        cmake,
        "-S",
        src,
        "-B",
        build,
        f"-DTensorRT_INCLUDE_DIR={include}",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
    ]
    if cuda_architectures is not None:
        cfg.append("-DCMAKE_CUDA_ARCHITECTURES=" + ";".join(_parse_archs(cuda_architectures)))
    _run(cfg, "cmake configure", log)
    _run(
        [
            cmake,
            "--build",
            build,
            "--target",
            "rwkv_trt_plugins",
            "rwkv_trt_plugins_autoregister",
            "-j",
            str(os.cpu_count() or 2),
        ],
        "plugin build",
        log,
    )
    out = build / LIBRARY_NAME
    for lib in (out, build / AUTOREGISTER_LIBRARY_NAME):
        if not lib.is_file():
            raise PluginBuildError(f"build finished but {lib} is missing (full log: {log})")
    return out


def _family(family: str):
    if family not in FAMILIES:
        raise PluginBuildError(f"unknown kernel family {family!r} (one of {', '.join(FAMILIES)})")
    folder, kernels, kernels_lib, host_src, host_lib = FAMILIES[family]
    return plugins_dir() / folder, kernels, kernels_lib, host_src, host_lib


def compile_kernels(out_dir, family: str = "wkv4", cuda_architectures: Archs = None, nvcc: str | None = None) -> Path:
    """nvcc one family's CUDA kernels (no TensorRT) into a shared library in ``out_dir``; returns its
    path. ``family``: "wkv4" (exports ``rwkvWkv4Forward``) or "wkvhead" (``rwkvWkv5/6/7Forward``; three
    files compiled in parallel). One architecture (e.g. ``cuda_architectures=80``) takes seconds."""
    src, kernels, lib_name, _, _ = _family(family)
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise PluginBuildError("nvcc not found (set CUDACXX or CUDA_HOME, or put the CUDA toolkit on PATH)")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    gencode = _gencode_flags(cuda_architectures)
    base = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", *gencode, "-I", src]
    objs = [out_dir / (k + ".o") for k in kernels]
    procs = [
        subprocess.Popen(
            [str(c) for c in base + ["-c", src / k, "-o", o]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k, o in zip(kernels, objs)
    ]
    for proc in procs:
        text = proc.communicate()[0]
        if proc.returncode != 0:
            raise PluginBuildError(f"nvcc ({family} kernels) failed: {_first_error(text)}")
    out = out_dir / lib_name
    _run([nvcc, "-shared", *gencode, *objs, "-o", out], f"nvcc link ({family} kernels)")
    return out


def compile_kernels_only(out_dir, cuda_architectures: Archs = None, nvcc: str | None = None) -> Path:
    """The RWKV-4 kernels into ``out_dir/librwkv_wkv4_kernels.so`` (``compile_kernels(family="wkv4")``)."""
    return compile_kernels(out_dir, "wkv4", cuda_architectures, nvcc)
