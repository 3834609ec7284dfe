"""``python -m rwkv_export.targets.tensorrt.polygraphy_run ARGS...``: Polygraphy's own CLI with the RWKV
plugins registered.

Why not plain ``polygraphy run ... --plugins LIB``: Polygraphy's ``LoadPlugins`` only ``dlopen``s the
library, and its ONNX loader runs that *before* its first use of TensorRT imports the ``tensorrt``
module (``NetworkFromOnnxPath`` resolves the path, which is the ``LoadPlugins`` wrapper, before it
creates the ``trt.Builder``). Our plugin libraries register into the TensorRT already in the process:
``librwkv_trt_plugins.so`` registers nothing on a plain ``dlopen`` (it is TensorRT's ``loadLibrary``
library), and ``librwkv_trt_plugins_autoregister.so`` finds no TensorRT yet and only warns. Either way
the parser (TensorRT >= 10.7) silently builds the custom nodes from their ONNX function bodies, and an
engine built that way is not the one the plugin export asks for.

This wrapper imports ``tensorrt`` first, registers every ``--plugins`` library the way it needs
(``loader.register_plugins``, as ``validate --backend tensorrt`` does: ``loadLibrary`` for the main
library, ``dlopen`` for the autoregister one and any other), then hands the unchanged arguments to
Polygraphy, whose own later ``dlopen`` of the same files is a no-op.
"""

from __future__ import annotations

import sys

from .loader import register_plugins


def plugin_paths(argv: list) -> list:
    """The libraries named by Polygraphy's ``--plugins`` (which takes one or more paths)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--plugins="):
            out.append(a.split("=", 1)[1])
        elif a == "--plugins":
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                out.append(argv[i])
                i += 1
            continue
        i += 1
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import tensorrt as trt  # first: the plugin libraries register into the TensorRT already loaded
    except ImportError:
        print("Error: tensorrt is not installed (pip install 'rwkv-runtime[tensorrt]')", file=sys.stderr)
        return 1
    try:
        register_plugins(trt, plugin_paths(argv), echo=lambda m: print(m, file=sys.stderr), dlopen=True)
    except (OSError, ValueError) as e:  # ValueError: the loader's TensorRTError (one line)
        print(f"Error: {e}", file=sys.stderr)
        return 1
    try:
        from polygraphy.tools._main import main as polygraphy_main
    except ImportError:
        print("Error: polygraphy is not installed (pip install polygraphy)", file=sys.stderr)
        return 1
    sys.argv = ["polygraphy", *argv]
    return polygraphy_main() or 0


if __name__ == "__main__":
    sys.exit(main())
