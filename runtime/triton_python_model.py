"""Triton Python backend model: an rwkv-export model run by rwkv_runtime (the CPU deployment path).

``rwkv-export triton MODEL --backend python`` copies this file to ``REPO/NAME/1/model.py`` beside the
exported graphs. Triton's Python backend has no implicit state, so this model keeps each sequence's
recurrent state itself, keyed by the CORRID control input:

- a request carries ``tokens`` [1, T]: the prompt (any length, prefilled at once) or one new token;
- START starts a fresh state (the manifest's initial state, learned or not); END drops it after the reply;
- the sequence batcher (``oldest`` strategy) hands ``execute`` requests of different sequences together:
  their one-token steps run as ONE batched step (``rwkv_runtime.generation.step_rows``: if that batch
  fails, it is retried sequence by sequence, so one sequence's failure fails its request alone);
- the reply is ``logits`` [1, vocab] of the last position; the client samples (same as with the
  onnxruntime/TensorRT backends, where Triton keeps the state).

States of sequences Triton reaped for idleness (no END ever arrives) are dropped after the same idle time.
The stub's interpreter must be able to import ``rwkv_runtime``: see docs/triton.md ("Python backend").
"""

import json
import logging
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

log = logging.getLogger("rwkv_runtime.triton")


def _scalar(request, name, default=0):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return default if t is None else t.as_numpy().reshape(-1)[0].item()


def _error(message, bad_request=True):
    """An error reply. A client's mistake is INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT), not the
    default INTERNAL (500); stubs older than the error codes (Triton < 23.12) take the message only."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if bad_request else "INTERNAL", None)
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=err)


def _internal(e):
    """One line for an unexpected exception (Triton would otherwise fail the whole batch with it)."""
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return _error(f"internal error ({type(e).__name__}{': ' + msg if msg else ''})", bad_request=False)


class TritonPythonModel:
    def initialize(self, args):
        from rwkv_runtime import Session

        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params["rwkv.model_file"]
        threads = int(params.get("rwkv.threads") or 0) or None
        self.session = Session(path, threads=threads)
        man = self.session.manifest
        self.tokens_name, self.logits_name, self.vocab = man.tokens_input, man.logits_output, man.vocab_size
        # protobuf's JSON writes uint64 as a string
        idle_us = float(cfg.get("sequence_batching", {}).get("max_sequence_idle_microseconds") or 1e6)
        self.idle_s = idle_us / 1e6
        self.states = {}  # corrid -> [State (batch 1), last use (monotonic s)]

    def _reap(self, now, keep=()):
        # Triton is the authority on idleness (a sequence with a request queued is not idle, however long
        # it waited): never drop the state of a sequence that has a request in this batch
        for k in [k for k, (_, t) in self.states.items() if now - t > self.idle_s and k not in keep]:
            del self.states[k]

    def execute(self, requests):
        from rwkv_runtime import RuntimeUserError
        from rwkv_runtime.generation import step_rows

        now = time.monotonic()
        keep = set()
        for r in requests:
            try:
                keep.add(_scalar(r, "CORRID"))
            except Exception:  # noqa: BLE001 - reported with that request below
                pass
        self._reap(now, keep)
        replies = [None] * len(requests)
        steps = []  # (request index, corrid, token, state, end, start): run together as one batch
        for i, r in enumerate(requests):
            corrid, start, end = None, False, False
            try:
                corrid = _scalar(r, "CORRID")
                start, end = bool(_scalar(r, "START")), bool(_scalar(r, "END"))
                toks = pb_utils.get_input_tensor_by_name(r, self.tokens_name).as_numpy().reshape(-1)
                if toks.size == 0:
                    raise RuntimeUserError("tokens is empty")
                if toks.min() < 0 or toks.max() >= self.vocab:  # checked here: one bad request must not fail a batch
                    bad = int(toks[(toks < 0) | (toks >= self.vocab)][0])
                    raise RuntimeUserError(f"token id {bad} is outside [0, {self.vocab})")
                if start:
                    state = self.session.new_state(1)
                elif corrid in self.states:
                    state = self.states[corrid][0]
                else:
                    raise RuntimeUserError(
                        f"sequence {corrid} has no state here: start it with sequence_start "
                        "(or it was idle longer than max_sequence_idle_microseconds)"
                    )
                if toks.size == 1:
                    steps.append((i, corrid, toks.astype(np.int64), state, end, start))
                    continue
                logits, state = self.session.prefill(toks.astype(np.int64)[None], state)
                replies[i] = self._finish(corrid, logits, state, end)
            except Exception as e:  # noqa: BLE001 - one bad request fails alone, as one line
                # END: Triton closes the sequence anyway. START: Triton has started a new sequence under
                # this id, so an older state kept for it must not be continued by the next request.
                if end or start:
                    self.states.pop(corrid, None)
                replies[i] = self._failed(e)
        if steps:  # one batched step (the generation core's): a sequence whose own step fails fails alone
            results = step_rows(self.session, np.concatenate([x[2] for x in steps]), [x[3] for x in steps])
            for (i, corrid, _, _, end, start), res in zip(steps, results):
                if isinstance(res, BaseException):
                    if end or start:
                        self.states.pop(corrid, None)
                    replies[i] = self._failed(res)
                else:
                    replies[i] = self._finish(corrid, res[0][None], res[1], end)
        return replies

    @staticmethod
    def _failed(e):
        from rwkv_runtime import RuntimeUserError

        if isinstance(e, RuntimeUserError):
            return _error(str(e))
        log.error("request failed", exc_info=e)  # the traceback stays in Triton's log; the client gets one line
        return _internal(e)

    def _finish(self, corrid, logits, state, end):
        if end:
            self.states.pop(corrid, None)
        else:  # idle from when this request finished (a long prefill is not idle time)
            self.states[corrid] = [state, time.monotonic()]
        out = pb_utils.Tensor(self.logits_name, np.ascontiguousarray(logits, dtype=np.float32))
        return pb_utils.InferenceResponse(output_tensors=[out])

    def finalize(self):
        self.states.clear()
