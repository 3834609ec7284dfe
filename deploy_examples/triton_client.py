"""Stream text from an RWKV model served by Triton (any repository written by ``rwkv-export triton``).

One conversation = one Triton sequence: the prompt goes in with ``sequence_start``, every generated token
is sent back as the next request of the same ``sequence_id``, and the last request carries
``sequence_end`` (pass ``keep_open=True`` to continue the conversation later with the same id: the server
keeps its state until it ends or sits idle longer than the model's ``max_sequence_idle_microseconds``).

The model's reply to each request is the logits of its last token; sampling happens here (rwkv_runtime's
Sampler, ChatRWKV semantics; temperature 0 = greedy). The tokenizer comes from the manifest the
repository carries (config parameter ``rwkv.manifest``). A python-backend model takes a whole prompt per
request; an onnxruntime/TensorRT model (Triton keeps the state) takes one token per request.

    python deploy_examples/triton_client.py --url 127.0.0.1:8000 --model tiny "The capital of France is"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import numpy as np


class TritonRWKV:
    """A served model: its manifest, tokenizer and request shape, read once from the model config."""

    def __init__(self, url: str, model: str, protocol: str = "http"):
        from rwkv_runtime import RuntimeUserError
        from rwkv_runtime.artifact import parse_manifest
        from rwkv_runtime.tokenizers import make_tokenizer

        if protocol == "grpc":
            import tritonclient.grpc as tc

            self.client = tc.InferenceServerClient(url)
            cfg = self.client.get_model_config(model, as_json=True)["config"]
        elif protocol == "http":
            import tritonclient.http as tc

            self.client = tc.InferenceServerClient(url)
            cfg = self.client.get_model_config(model)
        else:
            raise RuntimeUserError(f"protocol must be http or grpc, not {protocol!r}")
        self.tc, self.model = tc, model
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        if "rwkv.manifest" not in params:
            raise RuntimeUserError(
                f"model {model!r} has no rwkv.manifest parameter (not written by rwkv-export triton)"
            )
        self.manifest = parse_manifest(params["rwkv.manifest"], f"{model} (Triton config)")
        self.tokenizer = make_tokenizer(self.manifest.tokenizer, params.get("rwkv.tokenizer_json") or None)
        tok = next(i for i in cfg["input"] if i["name"] == self.manifest.tokens_input)
        self.whole_prompt = int(tok["dims"][0]) == -1  # python backend: [-1]; implicit-state graphs: [1]

    def _send(self, tokens, sequence_id, start: bool, end: bool) -> np.ndarray:
        t = self.tc.InferInput(self.manifest.tokens_input, [1, len(tokens)], "INT64")
        t.set_data_from_numpy(np.asarray([tokens], dtype=np.int64))
        out = [self.tc.InferRequestedOutput(self.manifest.logits_output)]
        # the id as a header too: a load balancer in front of several servers hashes it (docs/triton.md)
        r = self.client.infer(
            self.model,
            [t],
            outputs=out,
            sequence_id=sequence_id,
            sequence_start=start,
            sequence_end=end,
            headers={"x-sequence-id": str(sequence_id)},
        )
        return r.as_numpy(self.manifest.logits_output)[0]

    def feed(self, tokens, sequence_id, start: bool, end: bool = False) -> np.ndarray:
        """Feed tokens to a sequence; returns the logits after the last one."""
        tokens = [int(x) for x in tokens]
        if not tokens:
            raise ValueError("no tokens to feed")
        if self.whole_prompt:
            return self._send(tokens, sequence_id, start, end)
        logits = None
        for j, x in enumerate(tokens):
            logits = self._send([x], sequence_id, start and j == 0, end and j == len(tokens) - 1)
        return logits

    def generate_tokens(
        self,
        prompt_tokens,
        sequence_id,
        max_new_tokens: int = 50,
        sampling=None,
        start: bool = True,
        keep_open: bool = False,
    ) -> Iterator[int]:
        """Prefill, then sample and feed back; yields token ids (as ``Session.generate_tokens`` does)."""
        from rwkv_runtime import RuntimeUserError, Sampler, SamplingParams

        sampler = Sampler(sampling or SamplingParams())
        n = int(max_new_tokens)
        if n < 0:  # (range(n) would be empty and the sequence never ended: it would hold a slot until reaped)
            raise RuntimeUserError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
        prompt_tokens = [int(x) for x in prompt_tokens]
        if not prompt_tokens:
            raise ValueError("no tokens to feed")
        closed = False  # whether this call has ended the sequence on the server
        try:
            logits = self.feed(prompt_tokens, sequence_id, start, end=(n == 0 and not keep_open))
            closed = n == 0 and not keep_open
            for i in range(n):
                tok = sampler(logits)
                if tok in sampler.params.stop:
                    if not keep_open:  # end the sequence (its state is freed) with the stop token
                        self.feed([tok], sequence_id, False, end=True)
                        closed = True
                    return
                yield tok
                last = i == n - 1
                logits = self.feed([tok], sequence_id, False, end=last and not keep_open)
                closed = last and not keep_open
        finally:
            # stopped early (the caller's break or close, a refused request, an error): end the sequence now,
            # else it holds one of the server's max_candidate_sequences slots until the idle timeout (300 s)
            if not closed and not keep_open:
                try:
                    self.feed([0], sequence_id, False, end=True)  # any valid id: the reply is dropped
                except Exception:  # noqa: BLE001 - the server may be why we stopped; it reaps the sequence then
                    pass

    def generate(self, prompt: str, sequence_id, max_new_tokens: int = 50, sampling=None, **kw) -> Iterator[str]:
        """Stream text pieces (multi-byte characters are held back until complete)."""
        from rwkv_runtime.tokenizers import StreamDecoder

        dec = StreamDecoder(self.tokenizer)
        for tok in self.generate_tokens(self.tokenizer.encode(prompt), sequence_id, max_new_tokens, sampling, **kw):
            piece = dec.push(tok)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Stream text from an RWKV model served by Triton.")
    ap.add_argument("prompt")
    ap.add_argument("--url", default="127.0.0.1:8000", help="host:port of Triton's HTTP (or gRPC) endpoint")
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--model", required=True, help="the model name in the repository")
    ap.add_argument("--sequence-id", type=int, default=1, help="Triton correlation id (one per conversation)")
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.85)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args(argv)
    from rwkv_runtime import RuntimeUserError, SamplingParams

    try:
        m = TritonRWKV(a.url, a.model, a.protocol)
        sp = SamplingParams(temperature=a.temperature, top_p=a.top_p, seed=a.seed)
        for piece in m.generate(a.prompt, a.sequence_id, a.max_tokens, sp):
            print(piece, end="", flush=True)
        print()
    except RuntimeUserError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - tritonclient's exceptions (connection refused, server errors)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"Error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
