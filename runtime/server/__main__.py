"""``python -m rwkv_runtime.server MODEL [--host 127.0.0.1] [--port 8000] ...`` (no torch, no click)."""
from __future__ import annotations

import argparse
import sys

from rwkv_runtime import RuntimeUserError

from .engine import EngineConfig
from .runner import ServerOptions, run


def parser() -> argparse.ArgumentParser:
    d = EngineConfig()
    p = argparse.ArgumentParser(prog="python -m rwkv_runtime.server", description=__doc__)
    p.add_argument("model", help="an exported model (.onnx, with its .seq.onnx beside it)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the `model` clients ask for (default: the file name)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="queued requests before 429")
    p.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk,
                   help="prompt chunk length (prefix states are cached at chunk ends)")
    p.add_argument("--prefill-budget", type=int, default=d.prefill_budget,
                   help="prompt tokens prefilled between two decode steps")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="longer prompts get 413")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="ceiling on max_tokens")
    p.add_argument("--default-max-tokens", type=int, default=256, help="chat requests without max_tokens")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds per request")
    p.add_argument("--cache-mb", type=float, default=d.cache_bytes / 2**20, help="prefix-state cache (0: off)")
    p.add_argument("--chat-template", default=None, help="JSON file: system/user/assistant/separator/stop")
    p.add_argument("--stop-token", type=int, action="append", default=None,
                   help="end-of-text token id (repeatable; default 0 for World-tokenizer models)")
    p.add_argument("--drain-seconds", type=float, default=10.0, help="graceful shutdown: time to finish streams")
    p.add_argument("--decode-graph", default="auto", choices=["auto", "step"],
                   help="auto: one onnxruntime session, weights once; step: the step graph decodes (2 copies, faster)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def options_from(a) -> ServerOptions:
    for name in ("max_batch", "max_queue", "prefill_chunk", "prefill_budget", "max_prompt_tokens", "max_tokens",
                 "default_max_tokens"):
        if getattr(a, name) < 1:
            raise RuntimeUserError(f"--{name.replace('_', '-')} must be >= 1")
    if a.cache_mb < 0 or a.request_timeout <= 0 or a.drain_seconds < 0:
        raise RuntimeUserError("--cache-mb, --request-timeout and --drain-seconds must not be negative")
    eng = EngineConfig(max_batch=a.max_batch, max_queue=a.max_queue, prefill_chunk=a.prefill_chunk,
                       prefill_budget=a.prefill_budget, max_prompt_tokens=a.max_prompt_tokens, max_tokens=a.max_tokens,
                       request_timeout=a.request_timeout, cache_bytes=int(a.cache_mb * 2**20))
    return ServerOptions(a.model, a.model_name, a.threads, None, eng, a.chat_template, a.default_max_tokens,
                         tuple(a.stop_token) if a.stop_token else None, a.drain_seconds, decode_graph=a.decode_graph)


def main(argv=None):
    a = parser().parse_args(argv)
    try:
        run(options_from(a), a.host, a.port, a.log_level)
    except RuntimeUserError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
