"""Prometheus metrics of the combiner. Every worker process writes its own; the supervising
process (``python -m combiner``) serves them summed over workers (prometheus_client's
multiprocess mode, through PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BATCHED",
    "CASCADE_ROWS",
    "IN_FLIGHT",
    "LATENCY",
    "MEMBER_LATENCY",
    "PARTIAL",
    "REQUESTS",
    "SHARED_BYTES",
]

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

REQUESTS = Counter("chorus_requests", "Inference requests answered, by gRPC status code", ["code"])
LATENCY = Histogram(
    "chorus_request_latency_seconds",
    "End-to-end latency of inference requests",
    buckets=_BUCKETS,
)
MEMBER_LATENCY = Histogram(
    "chorus_member_latency_seconds",
    "Latency of calls on Triton: per member, or of the fan-out model that calls them all",
    ["member"],
    buckets=_BUCKETS,
)
PARTIAL = Counter(
    "chorus_partial_answers", "Answers combined from fewer than all members (deadline, errors)"
)
IN_FLIGHT = Gauge(
    "chorus_requests_in_flight", "Inference requests being served", multiprocess_mode="livesum"
)
BATCHED = Histogram(
    "chorus_batched_requests",
    "Client requests gathered into each batch sent to the members",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
SHARED_BYTES = Counter(
    "chorus_shared_memory_bytes",
    "Bytes of member inputs and outputs passed to Triton through shared memory, not gRPC",
    ["direction"],
)
CASCADE_ROWS = Counter(
    "chorus_cascade_rows",
    "Rows a cascade answered, by the tier that answered them (from 0)",
    ["tier"],
)
