"""Builds the TensorRT-free test harness: librwkv_trt_plugins.so (CMake), the stand-in
libnvinfer.so.<major> (mock_nvinfer.cpp) and the C++ driver (mock_trt_check.cpp). Used by
tests/tensorrt/test_plugins.py and gpu_check.py. Needs TensorRT headers, nvcc, cmake and a C++ compiler."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGINS = HERE.parent


class HarnessUnavailable(RuntimeError):
    """A tool or header the harness needs is missing (the message says which)."""


def trt_major(include: Path) -> int:
    text = (Path(include) / "NvInferVersion.h").read_text()
    m = re.search(r"#define\s+(?:TRT_MAJOR_ENTERPRISE|NV_TENSORRT_MAJOR)\s+(\d+)", text)
    if m is None:
        raise HarnessUnavailable(f"no major version in {include}/NvInferVersion.h")
    return int(m.group(1))


def cudart_static(cuda_include):
    if cuda_include is None:
        return None
    root = Path(cuda_include).parent
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (root / sub / "libcudart_static.a").is_file():
            return root / sub / "libcudart_static.a"
    return None


def build_harness(tp, include, out_dir, cuda_architectures=80) -> dict:
    """tp: the rwkv_export.targets.tensorrt.plugin module. Returns paths: plugin, autoregister, copy, mock, driver; and major."""
    include = Path(include)
    if not (include / "NvInfer.h").is_file():
        raise HarnessUnavailable(f"no NvInfer.h in {include}")
    if tp.find_nvcc() is None or shutil.which("cmake") is None:
        raise HarnessUnavailable("nvcc or cmake not found")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise HarnessUnavailable("no C++ compiler")
    cuda_inc = tp.cuda_include_dir()
    cudart = cudart_static(cuda_inc)
    if cuda_inc is None or cudart is None:
        raise HarnessUnavailable("CUDA headers or libcudart_static.a not found")
    out = Path(out_dir)
    plugin = tp.build_plugin(include, build_dir=out / "build", cuda_architectures=cuda_architectures)
    autoregister = plugin.with_name(tp.AUTOREGISTER_LIBRARY_NAME)
    copy = out / "copy" / "librwkv_trt_plugins_copy.so"  # a second copy of the file: separate statics
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(plugin, copy)
    major = trt_major(include)
    mock_dir = out / "mock"
    mock_dir.mkdir(parents=True, exist_ok=True)
    mock = mock_dir / f"libnvinfer.so.{major}"
    common = [
        cxx,
        "-std=c++17",
        "-O1",
        "-Wno-deprecated-declarations",
        "-isystem",
        str(include),
        "-isystem",
        str(cuda_inc),
        "-I",
        str(PLUGINS / "wkv4"),
        "-I",
        str(PLUGINS / "wkvhead"),
    ]
    for cmd in (
        [
            *common,
            "-shared",
            "-fPIC",
            "-DTENSORRT_BUILD_LIB",
            f"-Wl,-soname,{mock.name}",
            str(HERE / "mock_nvinfer.cpp"),
            "-o",
            str(mock),
            "-ldl",
        ],
        [
            *common,
            str(HERE / "mock_trt_check.cpp"),
            str(mock),
            f"-Wl,-rpath,{mock_dir}",
            str(cudart),
            "-lpthread",
            "-lrt",
            "-ldl",
            "-o",
            str(mock_dir / "mock_trt_check"),
        ],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compile failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return {
        "plugin": plugin,
        "autoregister": autoregister,
        "copy": copy,
        "mock": mock,
        "driver": mock_dir / "mock_trt_check",
        "major": major,
    }
