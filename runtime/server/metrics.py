"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401 - re-exported for app.py
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "rwkv_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("rwkv_prompt_tokens", "Prompt tokens received", registry=r)
        self.prefill_tokens = Counter(
            "rwkv_prefill_tokens",
            "Prompt tokens actually run through the model (prompt tokens minus those restored from the prefix cache)",
            registry=r,
        )
        self.cached_tokens = Counter(
            "rwkv_prefix_cache_tokens", "Prompt tokens restored from the prefix cache", registry=r
        )
        self.generated_tokens = Counter("rwkv_generation_tokens", "Tokens generated", registry=r)
        self.cache_hits = Counter("rwkv_prefix_cache_hits", "Prompts that reused a cached prefix state", registry=r)
        self.cache_misses = Counter("rwkv_prefix_cache_misses", "Prompts with no cached prefix", registry=r)
        self.cache_bytes = Gauge("rwkv_prefix_cache_bytes", "Bytes held by the prefix-state cache", registry=r)
        self.cache_entries = Gauge("rwkv_prefix_cache_entries", "Entries in the prefix-state cache", registry=r)
        self.finished = Counter(
            "rwkv_sequences_finished", "Sequences that left the batch, by reason", ["reason"], registry=r
        )
        self.running = Gauge("rwkv_running_sequences", "Sequences in the decode batch", registry=r)
        self.prefilling = Gauge("rwkv_prefilling_sequences", "Sequences whose prompt is being prefilled", registry=r)
        self.queued = Gauge("rwkv_queue_length", "Requests waiting for a batch slot", registry=r)
        self.steps = Counter("rwkv_decode_steps", "Batched decode steps run", registry=r)
        self.batch_size = Histogram(
            "rwkv_batch_size", "Sequences per decode step", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128)
        )
        self.prefill_stall = Histogram(
            "rwkv_prefill_tokens_between_steps",
            "Prompt tokens prefilled between two decode steps of running sequences",
            registry=r,
            buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
        )
        self.ttft = Histogram(
            "rwkv_time_to_first_token_seconds", "Request arrival to its first token", registry=r, buckets=_LATENCY
        )
        self.itl = Histogram(
            "rwkv_inter_token_seconds", "Time between a sequence's tokens", registry=r, buckets=_LATENCY
        )
        self.e2e = Histogram("rwkv_request_seconds", "Request arrival to its last token", registry=r, buckets=_LATENCY)

    def render(self) -> bytes:
        return generate_latest(self.registry)
