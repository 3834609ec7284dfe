"""Where an export goes after it is verified: TensorRT engines (``tensorrt/``), Triton model repositories,
browser bundles (``web``), ONNX Runtime Mobile (``mobile``), and the commands that drive them
(``triton_cli``, ``edge_cli``, ``serve_cli``). Each reads an export through ``rwkv_runtime.artifact``."""
