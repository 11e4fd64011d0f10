"""Inference metrics, labelled by model only: never a prompt, a tenant or a request id."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

QUEUE_WAIT = Histogram(
    "sluice_inference_queue_wait_seconds",
    "From the prompt being assembled to its generation starting",
    ["model"],
    buckets=_LATENCY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "sluice_inference_time_to_first_token_seconds",
    "From generation start to the first output token",
    ["model"],
    buckets=_LATENCY,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "sluice_inference_time_per_output_token_seconds",
    "Mean time between output tokens of one request, after the first",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
)
OUTPUT_TOKENS = Counter(
    "sluice_inference_output_tokens_total", "Output tokens generated (rate() = tokens/s)", ["model"]
)
REQUEST_TOKENS_PER_SECOND = Histogram(
    "sluice_inference_request_tokens_per_second",
    "Decode speed of one request: output tokens over generation time",
    ["model"],
    buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1280),
)
IN_FLIGHT = Gauge("sluice_inference_in_flight", "Generations running on this worker", ["model"])
BATCH_OCCUPANCY = Gauge(
    "sluice_inference_batch_occupancy", "Running generations over engine capacity (0..1)", ["model"]
)
ABORTED = Counter("sluice_inference_aborted_total", "Generations stopped by a cancel", ["model"])
EXPIRED = Counter("sluice_inference_expired_total", "Prompts whose deadline passed while queued", ["model"])
RESTARTED = Counter(
    "sluice_inference_restarted_total", "Prompts re-run as a new attempt after a worker died", ["model"]
)
FAILED = Counter("sluice_inference_failed_total", "Generations ended by an engine error", ["model"])
ENGINE_LOAD_FAILED = Gauge(
    "sluice_inference_engine_load_failed",
    "1 when the model's engine failed to load at start: the worker stays NOT_SERVING, out of its group",
    ["model"],
)
