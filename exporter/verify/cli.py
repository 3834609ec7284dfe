"""``rwkv-export validate``: both checks run, the report printed summary first (see the package docstring)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import click

from ..cli_options import choice_option, path_argument, path_option, plugin_option
from .compare import Err, _group, compare, error_of
from .report import Report, _short, _step_table, polygraphy_command, summary_table, verdict
from .rollout import free_run, make_rollout, prompt_ids
from .runners import REFERENCE_RUNNER, backend_runner, load_reference, reference_runner, require_tensorrt
from .target import (
    DEFAULT_CHUNK,
    DEFAULT_STEPS,
    ValidationError,
    _check_save_paths,
    _input_files,
    _save_atomically,
    default_tolerances,
    load_target,
)

FREE_RUNNING_RUNNER = "export-free-running"


def validate(
    model,
    reference,
    backend: str = "onnxruntime",
    graph: str | None = None,
    steps: int = DEFAULT_STEPS,
    prompt: str | None = None,
    tokens: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    save_inputs=None,
    save_outputs=None,
    plugins=(),
    onnx_path=None,
    echo=print,
    verbose: bool = False,
) -> Report:
    """Run both checks, print the report through ``echo`` (verdict and summary; ``verbose``: the per-step
    tables of both checks too) and return it."""
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.exception import PolygraphyException
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    if steps < 1:
        raise ValidationError(f"--steps must be at least 1, not {steps}")
    if chunk < 1:
        raise ValidationError(f"--chunk must be at least 1, not {chunk}")
    target = load_target(model, graph, onnx_path)
    man = target.manifest
    read = _input_files(model, target, reference, onnx_path, plugins)
    _check_save_paths({"--save-inputs": save_inputs, "--save-outputs": save_outputs}, read)
    if target.is_engine:
        backend = "tensorrt"
    if backend == "tensorrt":
        require_tensorrt()
    d_atol, d_rtol = default_tolerances(man)
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if atol < 0 or rtol < 0:
        raise ValidationError("--atol and --rtol must not be negative")
    ids = prompt_ids(target, prompt, tokens)
    ref = load_reference(reference, man)
    seq = man.graph == "sequence"
    # a sequence graph is compared once per call (its logits at the call's last token): --steps counts
    # calls there, so that `--steps 4` checks 4 steps on either graph (it used to be 4 tokens: one call)
    roll = make_rollout(ref, target, ids, max(steps * chunk if seq else steps, len(ids)), chunk)

    out = []

    def say(line=""):
        line = line.rstrip()
        out.append(line)
        echo(line)

    def say_all(lines):
        for line in lines:
            say(line)

    prec = man.precision + (f" {man.options['quantize']}" if man.options.get("quantize") else "")
    say(
        f"validating {target.path.name}: {man.architecture} {man.graph} graph, {prec}, wkv {man.wkv}, backend {backend}"
    )
    say(f"reference: {Path(reference).name} (PyTorch, float32)")
    source = "the prompt" if prompt is not None or tokens is not None else "the start token"
    more = len(roll.ids) - roll.n_prompt
    say(
        f"rollout: {len(roll.ids)} tokens ({roll.n_prompt} from {source}"
        + (f", {more} the reference's greedy continuation)" if more else ")")
        + (f", fed {chunk} per call: {len(roll.pieces)} calls" if seq else "")
    )
    say(f"tolerance (Polygraphy's rule): an element fails when |err| > {atol:g} and |err|/|ref| > {rtol:g}")

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # our report says it all; failures still raise
        try:
            runner = backend_runner(target, backend, plugins, chunk)
            # 1. teacher-forced: Polygraphy's Comparator over the reference rollout
            results = Comparator.run([runner, reference_runner(ref, man)], data_loader=roll.feeds)
            tf_ok, tf_rows = compare(results[0], results[1], target, atol, rtol)
            # 2. free-running: the export fed back its own state; its logits against the reference's
            fr_outs = free_run(runner, target, roll)
            fr_ok, fr_rows = compare(
                (FREE_RUNNING_RUNNER, fr_outs), results[1], target, atol, rtol, outputs=[man.logits_output]
            )
            if save_inputs:
                _save_atomically(
                    save_inputs,
                    lambda dest: save_json(roll.feeds, dest, description="rwkv-export validate: rollout feeds"),
                    read,
                )
            if save_outputs:
                only_ref = RunResults()
                only_ref.append(results[1])  # the reference's outputs alone, as polygraphy --load-outputs reads them
                _save_atomically(save_outputs, only_ref.save, read)
        except PolygraphyException as e:
            raise ValidationError(f"Polygraphy: {(str(e).strip().splitlines() or ['failed'])[0][:200]}") from None
    # free-running state drift, for information (the verdict is on the logits)
    for row, e_out, r_out in zip(fr_rows, fr_outs, results[1][1]):
        for s in man.state:
            g = _group(s.output, man)
            row.groups[g] = row.groups.get(g, Err()).merge(error_of(e_out[s.output], r_out[s.output], atol, rtol))

    state_groups = list(OrderedDict.fromkeys(_group(s.output, man) for s in man.state))
    tf_bad = next((r.step for r in tf_rows if not r.passed), None)
    fr_bad = next((r.step for r in fr_rows if not r.passed), None)

    groups = [man.logits_output] + state_groups
    passed = tf_ok and fr_ok and tf_bad is None and fr_bad is None
    # summary first: the verdict, then one row per output group; the per-step tables only with --verbose
    say("")
    say(verdict(passed, tf_bad, fr_bad, len(tf_rows), len(fr_rows), chunk if seq else None))
    say("summary, over all steps (state fields over all layers; tol used above 100% fails):")
    say_all("  " + line for line in summary_table(tf_rows, fr_rows, groups, man))
    tf_agree = sum(r.agree[0] for r in tf_rows), sum(r.agree[1] for r in tf_rows)
    fr_agree = sum(r.agree[0] for r in fr_rows), sum(r.agree[1] for r in fr_rows)
    say(
        f"  logits argmax agreement: {tf_agree[0]}/{tf_agree[1]} teacher-forced, {fr_agree[0]}/{fr_agree[1]} "
        "free-running"
    )
    if tf_bad is not None:
        say(f"  teacher-forced step {tf_bad} failed in: {', '.join(_short(tf_rows[tf_bad].failed_outputs))}")
    if verbose:
        say("")
        say(
            f"1. teacher-forced: every step starts from the reference's state (Polygraphy Comparator, "
            f"{runner.name} vs {REFERENCE_RUNNER})"
        )
        say_all("  " + line for line in _step_table(tf_rows, roll, seq, groups, state_groups))
        say("")
        say(
            "2. free-running: the export fed back its own state, its logits compared with the reference's rollout "
            "(state drift shown for information)"
        )
        say_all("  " + line for line in _step_table(fr_rows, roll, seq, [man.logits_output], state_groups))
    else:
        say(f"  (the per-step tables of both checks: --verbose; {len(tf_rows)} rows each)")

    if save_inputs and save_outputs:
        say("")
        say("reproduce the teacher-forced check with Polygraphy alone:")
        say("  " + polygraphy_command(target, backend, save_inputs, save_outputs, atol, rtol, plugins, chunk))
    return Report(passed, tf_bad, fr_bad, out)


@click.command("validate")
@path_argument("model")
@path_option("--reference", required=True, help="The checkpoint MODEL was exported from (run in PyTorch, float32).")
@choice_option(
    "--backend",
    choices=["onnxruntime", "tensorrt"],
    default="onnxruntime",
    help="What runs the export (a .engine MODEL implies tensorrt).",
)
@click.option(
    "--graph",
    type=click.Choice(["step", "sequence"]),
    default=None,
    help="Which graph of the export to check (default: the one MODEL is; the other is found beside it).",
)
@click.option(
    "--steps",
    default=DEFAULT_STEPS,
    show_default=True,
    type=click.IntRange(1),
    help="Steps checked: tokens of the rollout for a step graph, calls of --chunk tokens for a sequence "
    "graph (the rollout: the prompt, then the reference's greedy continuation).",
)
@click.option(
    "--prompt",
    default=None,
    help="Start of the rollout, encoded with the model's tokenizer (default: the start token 0).",
)
@click.option("--tokens", default=None, help="Start of the rollout as token ids (1,2,3), instead of --prompt.")
@click.option(
    "--atol",
    type=click.FloatRange(0),
    default=None,
    help="Absolute tolerance (default by precision: fp32 1e-4, fp16 5e-2, ...).",
)
@click.option(
    "--rtol",
    type=click.FloatRange(0),
    default=None,
    help="Relative tolerance (default by precision: fp32 1e-3, fp16 5e-2, ...).",
)
@click.option(
    "--chunk", default=DEFAULT_CHUNK, show_default=True, type=click.IntRange(1), help="Sequence graph: tokens per call."
)
@path_option(
    "--save-inputs",
    default=None,
    help="Write the rollout's feeds as Polygraphy JSON (for polygraphy run --load-inputs).",
)
@path_option(
    "--save-outputs",
    default=None,
    help="Write the reference's outputs as Polygraphy RunResults (for polygraphy run --load-outputs).",
)
@plugin_option(
    help="TensorRT plugin library (default for plugin-mode exports: the built one).",
)
@path_option(
    "--onnx",
    "onnx_path",
    default=None,
    help="For a TensorRT engine: the ONNX file it was built from (its manifest; default: beside it).",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Also print the per-step tables of both checks (the verdict and summary come first either way).",
)
def validate_command(model, reference, verbose, **options):
    """Check exported MODEL against the PyTorch reference over a multi-step rollout (Polygraphy).

    Exits 1 when the export is wrong, naming the first step that broke tolerance.
    """
    from ..errors import user_errors

    run = user_errors(lambda: validate(model, reference, echo=click.echo, verbose=verbose, **options))
    if not run().passed:
        click.get_current_context().exit(1)
