"""Test-only builds of the plugin sources, on top of the shipped compiler driver
(``rwkv_export.targets.tensorrt.plugin``): the WKV math compiled for the CPU (the host reference), the
RWKV-5/6/7 CUDA kernels compiled to run on the CPU (the kernel emulator), optionally under
AddressSanitizer. Used by tests/tensorrt/test_plugins.py and plugins/tests/gpu_check.py (which put this
folder on sys.path); not part of the rwkv_export package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_plugin_module():
    """rwkv_export.targets.tensorrt.plugin, installed or straight from the checkout (it has no package
    imports, so it loads by file path without rwkv_export installed)."""
    try:
        from rwkv_export.targets.tensorrt import plugin

        return plugin
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "rwkv_trt_plugin", REPO / "exporter" / "targets" / "tensorrt" / "plugin.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


tp = load_plugin_module()


def compiler(cxx: str | None = None) -> str:
    cxx = cxx or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise tp.PluginBuildError("no C++ compiler found (set CXX)")
    return cxx


def compile_host_reference(out_dir, cxx: str | None = None, family: str = "wkv4", warnings: bool = False) -> Path:
    """Compile a family's kernel math for the CPU (``plugins/wkv4/wkv4Host.cpp`` or
    ``plugins/wkvhead/wkvHeadHost.cpp``) into a shared library in ``out_dir``; returns its path.
    float16 support needs cuda_fp16.h (found next to nvcc or in ``$CUDA_HOME``); without it the
    library handles float32 only. ``warnings``: -Wall -Wextra -Werror."""
    src, _, _, host_src, lib_name = tp._family(family)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / lib_name
    cmd = [compiler(cxx), "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-I", src]
    if warnings:
        cmd += ["-Wall", "-Wextra", "-Werror"]
    inc = tp.cuda_include_dir()
    if inc is not None:
        cmd += ["-isystem", inc]
    tp._run(cmd + [src / host_src, "-o", out], f"C++ compile ({family} host build)")
    return out


def compile_kernel_emulator(out_dir, cxx: str | None = None, sanitize: bool = False) -> Path:
    """``plugins/tests/wkvhead_emulator.cpp`` -> ``out_dir/librwkv_wkvhead_emulated[_asan].so``: the
    RWKV-5/6/7 CUDA kernels and launchers run on the CPU. ``sanitize``: with AddressSanitizer and
    UBSan (load it with LD_PRELOAD of :func:`asan_runtime`)."""
    inc = tp.cuda_include_dir()
    if inc is None:
        raise tp.PluginBuildError("the kernel emulator needs the CUDA headers (cuda_fp16.h)")
    src = tp.plugins_dir()
    out = Path(out_dir) / ("librwkv_wkvhead_emulated_asan.so" if sanitize else "librwkv_wkvhead_emulated.so")
    out.parent.mkdir(parents=True, exist_ok=True)
    # -O0 for the sanitized build: a third of the compile time, and the cases it runs are small
    cmd = [
        compiler(cxx),
        "-std=c++20",
        *(["-O0", "-g"] if sanitize else ["-O1"]),
        "-shared",
        "-fPIC",
        "-fvisibility=hidden",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-isystem",
        inc,
        "-I",
        src / "wkvhead",
    ]
    if sanitize:
        cmd += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    tp._run(cmd + [src / "tests" / "wkvhead_emulator.cpp", "-o", out, "-lpthread"], "C++ compile (kernel emulator)")
    return out


def asan_runtime(cxx: str | None = None) -> Path | None:
    """Path of the compiler's libasan.so (for LD_PRELOAD into python), or None."""
    try:
        cxx = compiler(cxx)
    except tp.PluginBuildError:
        return None
    r = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True)
    p = Path(r.stdout.strip())
    return p if r.returncode == 0 and p.is_absolute() and p.exists() else None
