"""validate's report: the verdict and a compact summary first (per output group: largest errors, share of
the tolerance used, worst and first bad step), the two per-step tables with ``--verbose``, and the
``polygraphy run`` line that repeats the teacher-forced check."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .compare import Err, StepRow
from .rollout import Rollout
from .target import DEFAULT_CHUNK, Target


def _g(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2e}"


def _token_label(roll: Rollout, i: int, seq: bool) -> str:
    if not seq:
        return str(roll.ids[i])
    start = sum(len(p) for p in roll.pieces[:i])
    return f"{start}-{start + len(roll.pieces[i]) - 1}"


def _pct(x: float) -> str:
    if math.isinf(x):
        return "inf"
    return "<0.01%" if x < 1e-4 else f"{100 * x:.3g}%"


def _step_table(rows: list, roll: Rollout, seq: bool, verdict_groups: list, state_groups: list) -> list:
    """One line per step: logits errors and argmax, the share of the tolerance used by the outputs
    that decide (``verdict_groups``), and the largest state error with the field it is in."""
    head = (
        f"{'step':>5} {'positions' if seq else 'token':>9}  {'logits abs':>10} {'rel':>9} {'argmax':>7} "
        f"{'tol used':>9}  {'state abs':>10}  worst field"
    )
    lines = [head]
    for row in rows:
        lg = row.groups[roll_logits(row)]
        ok, n = row.agree
        agree = "same" if ok == n else f"{ok}/{n}"
        used = max(row.groups[g].used for g in verdict_groups)
        worst = max(state_groups, key=lambda g: row.groups[g].abs)
        lines.append(
            f"{row.step:>5} {_token_label(roll, row.step, seq):>9}  {_g(lg.abs):>10} {_g(lg.rel):>9} "
            f"{agree:>7} {_pct(used):>9}  {_g(row.groups[worst].abs):>10}  {worst:<11}" + ("" if row.passed else "FAIL")
        )
    return _condense(lines)


def roll_logits(row: StepRow) -> str:
    return next(iter(row.groups))  # logits come first


def _condense(lines: list, head: int = 12, tail: int = 4) -> list:
    """The header, first and last rows and every failing row: readable for long rollouts."""
    body = lines[1:]
    if len(body) <= 48:
        return lines
    keep = set(range(head)) | set(range(len(body) - tail, len(body)))
    fails = [i for i, r in enumerate(body) if r.endswith("FAIL")]
    keep |= set(fails[:20])
    out, prev = [lines[0]], -1
    for i in sorted(keep):
        if i != prev + 1:
            out.append(f"{'...':>5}")
        out.append(body[i])
        prev = i
    return out


def summary_table(tf_rows: list, fr_rows: list, groups: list, man) -> list:
    """One line per output group of the teacher-forced check, then the free-running logits: the largest
    absolute and relative errors over all steps, the share of the tolerance used, the step where that
    share was largest, and the first step above the tolerance ('-': none)."""
    lines = [f"{'output':<22} {'max abs':>10} {'max rel':>9} {'tol used':>9}  {'worst step':>10}  first bad step"]
    entries = [(g if g == man.logits_output else f"{g} (x{man.n_layer})", tf_rows, g) for g in groups]
    entries.append((f"{man.logits_output} (free-running)", fr_rows, man.logits_output))
    for label, rows, g in entries:
        err, first, worst = Err(), None, None
        for row in rows:
            e = row.groups[g]
            if worst is None or e.used > err.used:
                worst = row.step
            err = err.merge(e)
            if first is None and e.used > 1:
                first = row.step
        lines.append(
            f"{label:<22} {_g(err.abs):>10} {_g(err.rel):>9} {_pct(err.used):>9}  "
            f"{'-' if worst is None else worst:>10}  {'-' if first is None else first}"
        )
    return lines


def verdict(passed: bool, tf_bad, fr_bad, n_tf: int, n_fr: int, chunk: int | None) -> str:
    """The one line that decides: PASS, or FAIL with the first step that broke the tolerance.
    ``chunk``: tokens per call of a sequence graph (None: a step graph)."""
    if passed:
        calls = f" (calls of the sequence graph, {chunk} tokens each)" if chunk else ""
        return f"PASS: {n_tf} teacher-forced and {n_fr} free-running steps{calls} within tolerance"
    if tf_bad is None and fr_bad is None:
        return "FAIL: Polygraphy's comparison failed, though no single step did"
    parts = [
        f"{what} step {step}"
        for what, step in (("teacher-forced", tf_bad), ("free-running", fr_bad))
        if step is not None
    ]
    first = min(step for step in (tf_bad, fr_bad) if step is not None)
    return f"FAIL: the export differs from the reference; first bad step: {first} ({', '.join(parts)})"


@dataclass
class Report:
    passed: bool
    teacher_forced_first_bad: int | None
    free_running_first_bad: int | None
    lines: list

    @property
    def first_bad_step(self) -> int | None:
        bad = [s for s in (self.teacher_forced_first_bad, self.free_running_first_bad) if s is not None]
        return min(bad) if bad else None


def _short(names: list, n: int = 4) -> list:
    return names[:n] + ([f"{len(names) - n} more"] if len(names) > n else [])


def polygraphy_command(
    target: Target, backend: str, save_inputs, save_outputs, atol, rtol, plugins=(), chunk: int = DEFAULT_CHUNK
) -> str:
    """The ``polygraphy run`` line that repeats the teacher-forced check from the saved files."""
    tail = f"--load-inputs {save_inputs} --load-outputs {save_outputs} --atol {atol:g} --rtol {rtol:g}"
    if backend == "onnxruntime":
        return f"polygraphy run {target.path} --onnxrt {tail}"
    libs = list(plugins) or list(target.plugins)
    if not libs and target.manifest.wkv == "plugin":
        from .targets.tensorrt.plugin import find_plugin

        libs = [find_plugin() or "librwkv_trt_plugins.so"]
    # with plugins, Polygraphy through our wrapper: it imports TensorRT before the libraries load
    prog = "python -m rwkv_export.targets.tensorrt.polygraphy_run run" if libs else "polygraphy run"
    cmd = f"{prog} {target.path} --trt" + ("" if target.is_engine else " --strongly-typed")
    if target.is_engine:
        cmd = f"{prog} {target.path} --model-type engine --trt"
    if libs:
        cmd += " --plugins " + " ".join(str(p) for p in libs)
    if target.manifest.graph == "sequence" and not target.is_engine:
        t = target.manifest.tokens_input
        cmd += f" --trt-min-shapes {t}:[1,1] --trt-opt-shapes {t}:[1,{chunk}] --trt-max-shapes {t}:[1,{chunk}]"
    return f"{cmd} {tail}"
