"""``rwkv-export eval``: the click command (the work is in eval.py)."""

from __future__ import annotations

import json
import sys

import click

from ..cli_options import choice_option, path_argument, path_option
from ..errors import user_errors


def _pad(value: str):
    if value.lower() == "none":
        return None
    try:
        v = int(value)
    except ValueError:
        raise click.BadParameter(f"a token id or 'none', not {value!r}") from None
    if v < 0:
        raise click.BadParameter(f"a token id is >= 0, not {v}")
    return v


def _format(man) -> str:
    q = (man.options or {}).get("quantize")
    if q:
        block = (man.options or {}).get("quant_block")
        return f"{q}" + (f" (block {block})" if block else "")
    return man.precision


@click.command("eval")
@path_argument("model")
@choice_option(
    "--task",
    choices=["lambada", "perplexity"],
    default="lambada",
    help='lambada: last-word prediction as BlinkDL scores it (.jsonl of {"text": ...}); '
    "perplexity: every token of a UTF-8 text file.",
)
@path_option("--data", required=True, help="The task's data file.")
@path_option(
    "--reference",
    default=None,
    help="The checkpoint the export came from: scored too (PyTorch, float32), and the difference printed.",
)
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N documents (lambada).")
@click.option("--batch", type=click.IntRange(1, 4096), default=16, show_default=True, help="Documents per batch.")
@click.option(
    "--pad-token",
    "pad",
    default="0",
    show_default=True,
    help="Token prepended to each context (lambada) or to the text (perplexity): 0 as in BlinkDL's "
    "scripts; 'none' for nothing.",
)
@click.option("--threads", default=None, type=click.IntRange(1), help="onnxruntime intra-op threads.")
@click.option("--provider", "providers", multiple=True, help="onnxruntime execution provider(s), in order.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@user_errors
def eval_command(model, task, data, reference, limit, batch, pad, threads, providers, as_json, quiet):
    """Score an exported MODEL on a task (LAMBADA, perplexity); with --reference, its checkpoint too."""
    from tqdm import tqdm

    from rwkv_runtime import Session

    from . import eval as ev

    pad = _pad(pad)
    if not data.exists():
        raise click.ClickException(f"{data}: no such file")
    s = Session(model, providers=list(providers) or None, threads=threads)
    runners = [("export", str(model), ev.ExportRunner(s))]
    if task == "lambada":
        items = ev.encode_lambada(s.encode, ev.read_lambada(data, limit), pad)
        ev.check_tokens(items, s.vocab_size, "lambada")
        what = f"{len(items)} documents"
    else:
        tokens = ([pad] if pad is not None else []) + s.encode(ev._read_text(data))
        ev.check_tokens(tokens, s.vocab_size, "perplexity")
        what = f"{len(tokens) - 1} tokens"
    if reference is not None:
        runners.append(("reference", str(reference), ev.ReferenceRunner(reference)))
    results = {}
    for name, path, runner in runners:
        if task == "lambada":
            bar = tqdm(
                total=len(items), desc=f"lambada {name}", file=sys.stderr, disable=quiet, leave=False, unit="doc"
            )
            try:
                r = ev.lambada(runner, items, batch, bar.update)
            finally:
                bar.close()
        else:
            r = ev.perplexity(runner, tokens)
        results[name] = (path, r)
    if as_json:
        out = {
            "task": task,
            "data": str(data),
            "items": what,
            "pad_token": pad,
            **{n: {"path": p, "perplexity": r.perplexity, "accuracy": r.accuracy} for n, (p, r) in results.items()},
        }
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(f"{task}: {what} from {data}" + (f", token {pad} prepended" if pad is not None else ""))
    for name, (path, r) in results.items():
        acc = f"  accuracy {r.accuracy * 100:.2f} %" if r.accuracy is not None else ""
        click.echo(f"{name:<10} perplexity {r.perplexity:.4f}{acc}  ({path})")
    if reference is not None:
        e, f = results["export"][1], results["reference"][1]
        rel = (e.perplexity / f.perplexity - 1) * 100
        line = f"export - reference: perplexity {e.perplexity - f.perplexity:+.4f} ({rel:+.3f} %)"
        if e.accuracy is not None:
            differ = int((e.correct != f.correct).sum())
            line += f", accuracy {(e.accuracy - f.accuracy) * 100:+.2f} points ({differ} documents judged differently)"
        click.echo(line)
        fmt = _format(s.manifest)
        if fmt != "fp32":
            cost = f"{(f.accuracy - e.accuracy) * 100:.2f} accuracy points, " if e.accuracy is not None else ""
            click.echo(f"cost of {fmt}: {cost}perplexity {(e.perplexity / f.perplexity - 1) * 100:+.2f} %")
