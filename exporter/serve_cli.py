"""``rwkv-export serve MODEL``: the OpenAI-compatible server of ``rwkv_runtime.server`` from the CLI."""
from __future__ import annotations

from pathlib import Path

import click

from rwkv_runtime.errors import RuntimeUserError


@click.command("serve")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless you mean it).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model-name", default=None, help="The `model` clients ask for (default: the file name).")
@click.option("--threads", default=None, type=click.IntRange(1), help="onnxruntime intra-op threads.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1), help="Sequences decoded together.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(1), help="Queued requests before 429.")
@click.option("--prefill-chunk", default=64, show_default=True, type=click.IntRange(1),
              help="Prompt chunk length (prefix states are cached at chunk ends).")
@click.option("--prefill-budget", default=256, show_default=True, type=click.IntRange(1),
              help="Prompt tokens prefilled between two decode steps (interleaved with decoding).")
@click.option("--max-prompt-tokens", default=8192, show_default=True, type=click.IntRange(1), help="Longer: 413.")
@click.option("--max-tokens", default=4096, show_default=True, type=click.IntRange(1), help="Ceiling on max_tokens.")
@click.option("--default-max-tokens", default=256, show_default=True, type=click.IntRange(1),
              help="For chat requests without max_tokens.")
@click.option("--request-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--cache-mb", default=256.0, show_default=True, type=click.FloatRange(0),
              help="Prefix-state cache budget (0: off).")
@click.option("--chat-template", default=None, type=click.Path(path_type=Path),
              help="JSON file with system/user/assistant/separator/stop.")
@click.option("--stop-token", "stop_tokens", multiple=True, type=click.IntRange(0),
              help="End-of-text token id (repeatable; default 0 for World-tokenizer models).")
@click.option("--drain-seconds", default=10.0, show_default=True, type=click.FloatRange(0),
              help="On SIGTERM: time in-flight streams get to finish.")
@click.option("--decode-graph", default="auto", show_default=True, type=click.Choice(["auto", "step"]),
              help="auto: one onnxruntime session (weights once); step: the step graph decodes (two copies, faster).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve_command(model, host, port, model_name, threads, max_batch, max_queue, prefill_chunk, prefill_budget,
                  max_prompt_tokens,
                  max_tokens, default_max_tokens, request_timeout, cache_mb, chat_template, stop_tokens,
                  drain_seconds, decode_graph, log_level):
    """Serve MODEL over an OpenAI-compatible HTTP API (continuous batching, prefix-state cache).

    Needs the serve extra (pip install "rwkv-export[serve]"). Endpoints: /v1/completions,
    /v1/chat/completions, /v1/models, /health, /metrics. See docs/serving.md.
    """
    try:
        from rwkv_runtime.server import EngineConfig, ServerOptions, run
    except ImportError as e:
        raise click.ClickException(f"serving needs the serve extra: pip install \"rwkv-export[serve]\" ({e.name} "
                                   "is missing)") from None
    if not Path(model).is_file():
        raise click.ClickException(f"{model}: no such file")
    eng = EngineConfig(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                       prefill_budget=prefill_budget,
                       max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, request_timeout=request_timeout,
                       cache_bytes=int(cache_mb * 2**20))
    opts = ServerOptions(str(model), model_name, threads, None, eng, str(chat_template) if chat_template else None,
                         default_max_tokens, tuple(stop_tokens) or None, drain_seconds, decode_graph=decode_graph)
    try:
        run(opts, host, port, log_level)
    except RuntimeUserError as e:  # (the CLI's user_errors, without importing cli.py: it imports us)
        raise click.ClickException(str(e)) from None
