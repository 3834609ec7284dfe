"""Errors by Polygraphy's rule: its verdict (``Comparator.compare_accuracy`` with the simple comparison)
and, per step and output group, the largest absolute and relative error and the share of the tolerance used."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .target import Target

_EPS = 2.220446049250313e-16  # Polygraphy's epsilon for zero reference values in relative errors


@dataclass
class Err:
    """The largest absolute and relative errors and the share of the tolerance used (max over
    elements of min(abs/atol, rel/rtol); Polygraphy fails an element exactly when it is > 1)."""

    abs: float = 0.0
    rel: float = 0.0
    used: float = 0.0

    def merge(self, other: Err) -> Err:
        return Err(max(self.abs, other.abs), max(self.rel, other.rel), max(self.used, other.used))


def error_of(export: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> Err:
    e = np.asarray(export, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if e.shape != r.shape:
        return Err(math.inf, math.inf, math.inf)
    d = np.abs(e - r)
    d = np.where(np.isnan(d), np.inf, d)
    rel = d / np.where(r == 0, _EPS, np.abs(r))
    with np.errstate(divide="ignore", invalid="ignore"):
        a_share = d / atol if atol > 0 else np.where(d > 0, np.inf, 0.0)
        r_share = rel / rtol if rtol > 0 else np.where(rel > 0, np.inf, 0.0)
    used = np.minimum(a_share, r_share)
    return Err(float(d.max(initial=0.0)), float(rel.max(initial=0.0)), float(used.max(initial=0.0)))


def _group(output: str, man) -> str:
    return man.logits_output if output == man.logits_output else output.rsplit(".", 1)[-1]


def _argmax_agree(export: np.ndarray, ref: np.ndarray) -> tuple:
    a, b = np.asarray(export).argmax(-1), np.asarray(ref).argmax(-1)
    return int(np.sum(a == b)), int(a.size)


@dataclass
class StepRow:
    step: int
    groups: dict  # group -> Err
    agree: tuple  # (agreeing positions, positions)
    passed: bool
    failed_outputs: list


def compare(export_run, ref_run, target: Target, atol: float, rtol: float, outputs=None):
    """Polygraphy's verdict (``Comparator.compare_accuracy``, export first so that relative errors
    are relative to the reference, as in ``polygraphy run --load-outputs``) plus per-step rows.
    ``export_run``/``ref_run``: (runner name, [outputs of each iteration])."""
    from polygraphy.comparator import Comparator, RunResults

    try:
        from polygraphy.comparator import SimpleCompareFunc

        func = SimpleCompareFunc(atol=atol, rtol=rtol)
    except ImportError:  # Polygraphy before SimpleCompareFunc
        from polygraphy.comparator import CompareFunc

        func = CompareFunc.simple(atol=atol, rtol=rtol)
    man = target.manifest
    names = outputs or [man.logits_output] + [s.output for s in man.state]
    results = RunResults()
    for name, iters in (export_run, ref_run):
        results.add([OrderedDict((n, it[n]) for n in names) for it in iters], runner_name=name)
    return _rows(
        Comparator.compare_accuracy(results, compare_func=func), export_run[1], ref_run[1], names, target, atol, rtol
    )


def _rows(accuracy, exp_iters, ref_iters, names, target: Target, atol, rtol) -> tuple:
    verdicts = next(iter(accuracy[0].values()))  # the one runner pair: [iteration] -> {output: result}
    man = target.manifest
    rows = []
    for i, (e, r, v) in enumerate(zip(exp_iters, ref_iters, verdicts)):
        groups: dict = OrderedDict()
        for n in names:
            g = _group(n, man)
            groups[g] = groups.get(g, Err()).merge(error_of(e[n], r[n], atol, rtol))
        failed = [n for n in names if not bool(v[n])]
        rows.append(StepRow(i, groups, _argmax_agree(e[man.logits_output], r[man.logits_output]), not failed, failed))
    return bool(accuracy), rows
