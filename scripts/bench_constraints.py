"""What constrained decoding costs a decode step: BatchGenerator steps at batch 1 and 32 with a JSON
schema active on every row, against the same rows with no constraint (same seeds, same model).

    python scripts/bench_constraints.py build/rwkv7-169m-world.onnx --batches 1,32 --steps 32 --rounds 3

The model needs a tokenizer (the World vocabulary: make_169m.py --version 7, exported with --tokenizer
world). The schema keeps every row going for the whole measurement (an array of at least 64 integers),
so the batch never shrinks. Also prints the engine's mask time alone per row (the figure docs/
structured-output.md quotes). Rounds alternate the two variants; medians with min-max are printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from rwkv_runtime import BatchGenerator, SamplingParams, Session
from rwkv_runtime import constraints as C

SCHEMA = {
    "type": "object",
    "properties": {"values": {"type": "array", "items": {"type": "integer"}, "minItems": 64}},
    "required": ["values"],
    "additionalProperties": False,
}


def step_ms(session, batch: int, steps: int, constrained: bool) -> float:
    """Median milliseconds per BatchGenerator.step (sampling + masks + the model step)."""
    gen = BatchGenerator(session)
    spec = C.json_schema(SCHEMA) if constrained else None
    for i in range(batch):
        gen.add("Data:", SamplingParams(temperature=1.0, top_p=1.0, seed=i, constraint=spec))
    for _ in range(3):  # warm-up
        gen.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        gen.step()
        times.append(time.perf_counter() - t0)
    assert len(gen.order) == batch, "a row finished early: the schema must outlast the measurement"
    return float(np.median(times)) * 1e3


def mask_us(session, batch: int, steps: int) -> float:
    """Microseconds per step for the masks of ``batch`` rows alone (prepare_masks + allowed())."""
    compiled = C.compile_constraint(C.json_schema(SCHEMA), session.tokenizer, session.vocab_size)
    rows = [compiled.start() for _ in range(batch)]
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        C.prepare_masks(rows)
        masks = [r.allowed() for r in rows]
        times.append(time.perf_counter() - t0)
        for r, m in zip(rows, masks):
            r.advance(int(rng.choice(np.flatnonzero(m))))
    return float(np.median(times)) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    s = Session(a.model, threads=a.threads)
    print(
        f"{a.model}: vocab {s.vocab_size}, tokenizer {s.manifest.tokenizer.get('kind')}; "
        f"{platform.processor() or platform.machine()}, {a.rounds} rounds, median (min-max)"
    )
    out = {}
    for b in [int(x) for x in a.batches.split(",")]:
        res = {"plain": [], "json_schema": []}
        for _ in range(a.rounds):
            res["plain"].append(step_ms(s, b, a.steps, False))
            res["json_schema"].append(step_ms(s, b, a.steps, True))
        m = mask_us(s, b, a.steps)
        p, c = np.median(res["plain"]), np.median(res["json_schema"])
        out[b] = {"plain_ms": p, "json_schema_ms": c, "overhead": c / p - 1, "mask_us": m}
        print(
            f"batch {b:>3}: step {p:8.2f} ms ({min(res['plain']):.2f}-{max(res['plain']):.2f}) plain, "
            f"{c:8.2f} ms ({min(res['json_schema']):.2f}-{max(res['json_schema']):.2f}) with a JSON schema: "
            f"{100 * (c / p - 1):+.1f}%; masks alone {m:.0f} us/step"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
