"""Verification: ``rwkv-export validate`` (an export against the PyTorch reference, over a rollout, through
Polygraphy), ``quality`` (the accuracy cost of reduced precision) and ``eval`` (``rwkv-export eval``).

One step from a fresh state proves little: RWKV carries everything in its state and errors
accumulate there. So validation runs a whole rollout (the prompt's tokens, continued greedily by
the reference) and makes two checks:

1. **Teacher-forced, with Polygraphy alone.** The data loader *is* the reference rollout: feed ``i``
   holds token(s) ``i`` and the reference's state before them (from the manifest's initial state;
   RWKV-4's ``pp`` starts at -1e30). ``Comparator.run`` runs the backend runner (``OnnxrtRunner``
   around our own ``InferenceSession``, or ``TrtRunner``) and ``pytorch-reference`` (a Polygraphy
   ``BaseRunner`` around the torch model) on every feed; ``Comparator.compare_accuracy`` with
   Polygraphy's simple comparison decides, for ``logits`` and every ``new_state.*`` output. Because
   each step starts from the reference's state, this check is reproducible with ``polygraphy run``
   from the saved feeds and reference outputs (``--save-inputs``/``--save-outputs``).
2. **Free-running.** The same backend runner is fed back its own state, as in real use, and its
   logits are compared, step by step and with the same rule, with the reference's rollout: this
   catches errors that are small per step but accumulate.

The tolerance rule is Polygraphy's (``elemwise``): an element fails when both
``|export - ref| > atol`` and ``|export - ref| / |ref| > rtol``. The report shows, per step and per
output group (logits; each state field, over all layers), the largest absolute and relative error
and the share of the tolerance used (the largest ``min(abs/atol, rel/rtol)``: above 1 fails).

Modules: ``target`` (what is validated: the model, its manifest, the files read), ``runners`` (the
reference and the backend as Polygraphy runners; TensorRT through ``targets.tensorrt.loader``, the one
engine loader), ``rollout`` (the reference rollout, its feeds, the free run), ``compare`` (Polygraphy's
verdict and per-step errors), ``report`` (the summary, the tables, the ``polygraphy run`` line) and ``cli``
(``validate`` and its click command).
"""
