"""The ``rwkv-export`` command line (click). User errors print one line and exit with status 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .cli_options import choice_option, output_option, path_argument, path_option
from .errors import user_errors

REPORT_TOKENS = 128  # held-out tokens the accuracy report after a reduced-precision export reads


class _Bar:
    """A stage-by-stage progress bar for long work (stderr, so stdout stays clean)."""

    def __init__(self, total: int, desc: str, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc=desc,
            file=sys.stderr,
            disable=quiet,
            leave=False,
            bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}] {postfix}",
        )

    def __call__(self, msg: str):
        self.bar.set_postfix_str(msg)
        self.bar.update(1)

    def close(self):
        self.bar.close()


class _Group(click.Group):
    """Every command, including those registered from other modules, gets the one-line treatment."""

    def invoke(self, ctx):
        return user_errors(super().invoke)(ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwkv-export")
def main():
    """RWKV checkpoints to ONNX / TensorRT, validated, and run without torch."""


# ---------------------------------------------------------------------------------------------
@main.command("export")
@path_argument("checkpoint")
@output_option(
    "out",
    help="Step graph path (e.g. model.onnx); the sequence graph goes beside it as model.seq.onnx.",
)
@click.option(
    "--graphs",
    default="step,sequence",
    show_default=True,
    help="Which graphs to write: step, sequence or both (comma-separated).",
)
@choice_option(
    "--wkv",
    choices=["plain", "plugin"],
    default="plain",
    help="plain: WKV as standard ONNX ops; plugin: one rwkv::WKV* node per layer (TensorRT >= 10.7 plugin; "
    "ONNX Runtime runs its function body).",
)
@choice_option(
    "--precision",
    choices=["fp32", "fp16", "bf16"],
    default="fp32",
    help="Weights and MatMuls; the state, WKV and normalisations stay float32 (explicit casts).",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8", "int4", "int8-dynamic"]),
    default=None,
    help="For CPUs; prints its accuracy cost. int8/int4: weight-only blocks (onnxruntime MatMulNBits); "
    "int8-dynamic: int8 weights and activations (DynamicQuantizeMatMul), fastest for batches.",
)
@click.option(
    "--quant-block",
    type=click.Choice(["16", "32", "64", "128", "256"]),
    default=None,
    help="Block size of --quantize int8/int4 along each row [default: 128 for int8, 32 for int4] "
    "(larger: smaller and faster, less accurate; "
    "docs/benchmarks.md compares them).",
)
@click.option(
    "--rescale-every",
    type=click.IntRange(0),
    default=None,
    help="RWKV-4 float16 residual rescaling interval (default 6 for fp16/bf16, 0 = off).",
)
@click.option("--all-logits", is_flag=True, help="Sequence graph returns logits for every position.")
@path_option(
    "--state-tuning",
    default=None,
    help="A state-tuning file (blocks.N.att.time_state, RWKV-5/6/7): baked in as the starting state.",
)
@click.option(
    "--tokenizer", default=None, help="bytes | world | none | path/to/tokenizer.json (default: from the model)."
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Store weights in one .data file beside the model, shared by its graphs (default: when exporting "
    "step and sequence graphs, or above 2 GB; --no-external-data embeds them in each graph).",
)
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Export weights that hold NaN or inf (refused by default, naming the tensor).",
)
@path_option(
    "--lora",
    default=None,
    help="A LoRA adapter (.pth/.safetensors, <weight>.lora_A/.lora_B as RWKV-PEFT writes them) merged "
    "into the weights: W + B@A * alpha/rank.",
)
@click.option(
    "--lora-alpha",
    type=float,
    default=None,
    help="The adapter's lora_alpha (its training setting) [default: the rank, i.e. scale 1].",
)
@click.option("-q", "--quiet", is_flag=True)
@user_errors
def export_cmd(checkpoint, out, quiet, **options):
    """Export CHECKPOINT (BlinkDL .pth, .safetensors, or a Hugging Face RWKV directory) to ONNX."""
    _isolated(lambda: _export(checkpoint, out, quiet=quiet, **options), checkpoint, out)


def _isolated(body, checkpoint: Path, out: Path) -> None:
    """Run ``body`` in a forked child when stdout/stderr are real files (POSIX).

    The export memory-maps the checkpoint; if another program truncates the file meanwhile, the next
    read of a page past the new end is a SIGBUS, which no Python code can catch. In a child, that (or
    any other fatal signal) costs only the child: this process then rolls back or removes what it
    left beside OUT (``safe_write.recover``) and prints one Error line. SIGTERM is passed on to the
    child (it ends as usual: one line, the old files kept); Ctrl-C reaches the child from the terminal."""
    import os
    import signal

    def real_fd(stream) -> bool:
        try:
            stream.fileno()
            return True
        except (AttributeError, OSError, ValueError):  # click's CliRunner, pytest's capture
            return False

    if (
        not hasattr(os, "fork")
        or os.environ.get("RWKV_EXPORT_NO_FORK")
        or not (real_fd(sys.stdout) and real_fd(sys.stderr))
    ):
        return body()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: the whole command, with the usual one-line errors; never returns
        code = 1
        try:
            user_errors(body)()
            code = 0
        except click.ClickException as e:
            e.show()
            code = e.exit_code
        except click.exceptions.Exit as e:
            code = e.exit_code
        except BaseException:  # noqa: BLE001 - anything else already printed by user_errors' rules
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    old = {
        s: signal.signal(s, (lambda signum, frame: os.kill(pid, signum)) if s != signal.SIGINT else signal.SIG_IGN)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if os.WIFEXITED(status):
        if os.WEXITSTATUS(status):
            raise click.exceptions.Exit(os.WEXITSTATUS(status))
        return
    sig = os.WTERMSIG(status)
    from rwkv_runtime.safe_write import recover

    from .export import sequence_path

    names = [p.name for p in (out, sequence_path(out))]
    recover(out, allowed=names + [n + ".data" for n in names])
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
    why = (
        f"{checkpoint} changed or was truncated while it was being read"
        if sig == signal.SIGBUS
        else "out of memory or killed"
        if sig == signal.SIGKILL
        else "a crash"
    )
    raise click.ClickException(f"the export died of {name} ({why}); {out} and its companions were left unchanged")


def _export(
    checkpoint,
    out,
    graphs,
    wkv,
    precision,
    quantize,
    quant_block,
    rescale_every,
    all_logits,
    state_tuning,
    tokenizer,
    external_data,
    allow_nonfinite,
    quiet,
    lora=None,
    lora_alpha=None,
):
    from .export import ExportOptions, export

    opts = ExportOptions(
        graphs=tuple(g.strip() for g in graphs.split(",") if g.strip()),
        wkv=wkv,
        precision=precision,
        quantize=quantize,
        quant_block=int(quant_block) if quant_block else None,
        rescale_every=rescale_every,
        all_logits=all_logits,
        tokenizer=tokenizer,
        external_data=external_data,
        allow_nonfinite=allow_nonfinite,
        state_tuning=str(state_tuning) if state_tuning else None,
        lora=str(lora) if lora else None,
        lora_alpha=lora_alpha,
    )
    bar = _Bar(opts.progress_steps(), "export", quiet)
    try:
        paths = export(checkpoint, out, opts, progress=bar)
    finally:
        bar.close()
    for p in paths:
        click.echo(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
    data = paths[0].with_name(paths[0].name + ".data")
    if data.is_file():
        click.echo(f"wrote {data} ({data.stat().st_size / 1e6:.1f} MB, the weights of every graph above)")
    if lora:
        click.echo(f"merged LoRA {lora} (alpha {'= rank, scale 1' if lora_alpha is None else f'{lora_alpha:g}'})")
    if (quantize or precision == "fp16") and "step" in opts.graphs:
        from .verify.quality import compare_to_reference

        ref = checkpoint
        if lora:  # the reference is the merged model
            from .checkpoint import load_checkpoint

            ref = load_checkpoint(checkpoint, lora=lora, lora_alpha=lora_alpha)
        # 128 tokens: the first signal of a damaging format, cheap next to the export (on 256 the report was
        # half of a 0.4B int8 export's time); `rwkv-export eval` is the measurement
        q = compare_to_reference(paths[0], ref, max_tokens=REPORT_TOKENS)
        click.echo(
            f"accuracy vs the float32 reference on {q['tokens']} held-out tokens: cross-entropy "
            f"{q['ce_model']:.4f} vs {q['ce_reference']:.4f} nats/token ({q['ce_change'] * 100:+.2f}%), "
            f"max logit error {q['max_abs_logit_error']:.3g}, argmax agreement {q['argmax_agreement'] * 100:.1f}%"
        )


# ---------------------------------------------------------------------------------------------
@main.command("convert-state")
@path_argument("checkpoint")
@path_argument("tuning")
@path_option("-o", "--output", "out", required=True)
@user_errors
def convert_state(checkpoint, tuning, out):
    """Convert a state-tuning file for CHECKPOINT into an .npz for Session(initial_state=...)."""
    from .export import state_tuning_to_npz

    click.echo(f"wrote {state_tuning_to_npz(checkpoint, tuning, out)}")


# ---------------------------------------------------------------------------------------------
@main.command()
@path_argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@user_errors
def inspect(model, as_json):
    """Print the manifest of an exported MODEL (.onnx or .engine)."""
    from rwkv_runtime import read_manifest

    if model.suffix in (".engine", ".plan", ".trt"):
        from rwkv_runtime.artifact import read_engine_manifest

        man, _ = read_engine_manifest(model)
    else:
        man, _ = read_manifest(model)
    if as_json:
        click.echo(man.to_json())
        return
    for k, v in man.summary().items():
        click.echo(f"{k:>15}: {v}")
    click.echo(f"{'companions':>15}: {', '.join(f'{k}={v}' for k, v in man.companions.items())}")
    click.echo(f"{'dims':>15}: {json.dumps(man.dims)}")
    click.echo("state:")
    for s in man.state:
        click.echo(f"  {s.name:<28} -> {s.output:<32} {str(s.shape):<18} {s.dtype} init={s.init:g}")


# ---------------------------------------------------------------------------------------------
@main.command()
@path_argument("model")
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("-n", "--max-tokens", default=100, show_default=True, type=click.IntRange(0))
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0))
@click.option("--top-p", default=0.85, show_default=True, type=click.FloatRange(0, 1))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0))
@click.option("--presence-penalty", default=0.0, show_default=True)
@click.option("--frequency-penalty", default=0.0, show_default=True)
@click.option("--seed", default=None, type=int)
@click.option("--threads", default=None, type=click.IntRange(1), help="onnxruntime intra-op threads.")
@click.option("--provider", "providers", multiple=True, help="onnxruntime execution provider(s), in order.")
@click.option("--low-memory", is_flag=True, help="One session (sequence graph for steps too), no weight prepacking.")
@user_errors
def generate(
    model,
    prompt,
    max_tokens,
    temperature,
    top_p,
    top_k,
    presence_penalty,
    frequency_penalty,
    seed,
    threads,
    providers,
    low_memory,
):
    """Generate text from an exported MODEL, streaming it; tokens/s at the end (stderr)."""
    from rwkv_runtime import SamplingParams, Session

    s = Session(model, providers=list(providers) or None, threads=threads, low_memory=low_memory)
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
    )
    gen = s.generate(prompt, max_tokens, params)  # every input checked here: no echoed prompt before an Error line
    click.echo(prompt, nl=False)
    for piece in gen:
        click.echo(piece, nl=False)
    click.echo()
    st = gen.stats
    dec = st["new_tokens"] / st["decode_s"] if st["decode_s"] > 0 else float("nan")
    click.echo(
        f"[{st['prompt_tokens']} prompt tokens in {st['prefill_s'] * 1e3:.1f} ms, "
        f"{st['new_tokens']} new tokens at {dec:.1f} tokens/s]",
        err=True,
    )


def _register_optional_commands():
    """Commands that live in their own modules (they import heavier things lazily)."""
    from .targets.tensorrt.engine import build_engine_command
    from .verify.cli import validate_command

    main.add_command(validate_command)
    main.add_command(build_engine_command)
    main.add_command(__import__("rwkv_export.targets.serve_cli", fromlist=["x"]).serve_command)
    main.add_command(__import__("rwkv_export.targets.triton_cli", fromlist=["x"]).triton_command)
    __import__("rwkv_export.targets.edge_cli", fromlist=["x"]).register(main)
    main.add_command(__import__("rwkv_export.verify.eval_cli", fromlist=["x"]).eval_command)


_register_optional_commands()


# ---------------------------------------------------------------------------------------------
@main.command()
@path_argument("model")
@click.option("--threads", default=None, type=click.IntRange(1), help="onnxruntime intra-op threads.")
@click.option("--batch", "batches", default="1,4", show_default=True, help="Decode batch sizes (comma-separated).")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(1), help="Decode steps timed.")
@click.option(
    "--prefill",
    "prefill_len",
    default=512,
    show_default=True,
    type=click.IntRange(0),
    help="Prompt length for prefill tokens/s (0: skip).",
)
@click.option("--provider", "providers", multiple=True, help="onnxruntime execution provider(s).")
@click.option("--low-memory", is_flag=True, help="One session (sequence graph for steps too), no weight prepacking.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@user_errors
def bench(model, threads, batches, tokens, prefill_len, providers, low_memory, as_json):
    """Measure MODEL: decode tokens/s, prefill tokens/s, time to first token, peak memory."""
    from rwkv_runtime import Session
    from rwkv_runtime.bench import run_bench

    try:
        bs = tuple(int(b) for b in batches.split(",") if b.strip())
    except ValueError:
        raise click.ClickException(f"--batch must be integers separated by commas, not {batches!r}") from None
    if not bs:  # else nothing would be measured, silently
        raise click.ClickException("--batch needs at least one batch size (e.g. 1,4)")
    s = Session(model, providers=list(providers) or None, threads=threads, low_memory=low_memory)
    if prefill_len and not s.backend.has("sequence"):
        prefill_len = 0
    res = run_bench(s, bs, tokens, prefill_len)
    res["threads"] = threads
    if as_json:
        click.echo(json.dumps(res, indent=1))
        return
    click.echo(f"{'model':<22}{model}")
    for b, v in res["decode_tps"].items():
        click.echo(f"{'decode batch ' + b:<22}{v:10.1f} tokens/s")
    if "prefill_tps" in res:
        click.echo(f"{'prefill ' + str(prefill_len):<22}{res['prefill_tps']:10.1f} tokens/s")
        click.echo(f"{'first token (64)':<22}{res['ttft_s_64'] * 1e3:10.1f} ms")
    click.echo(f"{'peak RSS':<22}{res['peak_rss_mb']:10.1f} MB")
