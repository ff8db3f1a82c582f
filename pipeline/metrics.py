"""The pipeline's own metrics, through Ray's metrics API (exported with Ray's other metrics to Prometheus).

Names are prefixed `pipeline_`; Ray adds its own `ray_` prefix on export, so Prometheus sees for
example `ray_pipeline_rows_total`. Each helper is one call from a stage. Metric objects are made on
first use: `import pipeline` stays cheap, and each Ray worker process makes its own.
Outside a Ray worker the records go nowhere (Ray drops them), so plain-Python stage runs are unaffected.
"""

from __future__ import annotations

import functools
import time
from collections import Counter

# Seconds: from an image (milliseconds) to a long clip or a large batch on a slow GPU (minutes).
SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
TOKEN_BOUNDARIES = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


@functools.cache
def _metric(kind: str, name: str, description: str, tag_keys: tuple = (), boundaries: tuple | None = None):
    from ray.util import metrics

    if kind == "histogram":
        return metrics.Histogram(name, description, boundaries=list(boundaries), tag_keys=tag_keys)
    return getattr(metrics, kind.capitalize())(name, description, tag_keys=tag_keys)


def rows_counter():
    return _metric("counter", "pipeline_rows", "Output rows by status and error_type.", ("status", "error_type"))


def quality_flags_counter():
    return _metric("counter", "pipeline_quality_flags", "Generated rows by quality flag (pipeline/quality/flags.py); a row may carry several.",
                   ("flag",))


def finish_reasons_counter():
    return _metric("counter", "pipeline_finish_reasons", "Generated rows by finish reason (stop: the model ended it; length: max_new_tokens).",
                   ("reason",))


def generated_rows_counter():
    return _metric("counter", "pipeline_generated_rows", "Rows with generated text (ok rows), by flagged (true: at least one quality flag).",
                   ("flagged",))


def decode_histogram():
    return _metric("histogram", "pipeline_decode_seconds", "Fetch + decode time of one item.",
                   ("media_type", "status"), tuple(SECONDS_BOUNDARIES))


def generate_histogram():
    return _metric("histogram", "pipeline_generate_seconds", "Time of one generate call (one batch).",
                   (), tuple(SECONDS_BOUNDARIES))


def tokens_histogram():
    return _metric("histogram", "pipeline_row_tokens", "Tokens per row, by kind (prompt or output).",
                   ("kind",), tuple(TOKEN_BOUNDARIES))


def tokens_counter():
    return _metric("counter", "pipeline_tokens", "Tokens processed, by kind (prompt or output).", ("kind",))


def inflight_gauge():
    return _metric("gauge", "pipeline_generate_inflight_rows",
                   "Rows inside one model actor's generate call (0 while it waits for input).")


def replica_failures_counter():
    return _metric("counter", "pipeline_replica_failures",
                   "Tensor-parallel replicas that went down (a rank died or hung), by what came next (restart or gave_up).",
                   ("outcome",))


def replica_failed(restarting: bool) -> None:
    """A tensor-parallel replica went down: restarted, or given up (its rows become model_error rows)."""
    replica_failures_counter().inc(tags={"outcome": "restart" if restarting else "gave_up"})


def clock() -> float:
    return time.perf_counter()


def decoded(items: list[dict], started: float) -> None:
    """After decode_media: one observation per item (the stage runs one item per call)."""
    seconds = (time.perf_counter() - started) / max(len(items), 1)
    for item in items:
        decode_histogram().observe(seconds, tags={"media_type": item.get("media_type") or "unknown",
                                                  "status": item["status"]})


def generating(rows: list[dict]) -> float:
    """Before a generate call: the rows this model actor now holds (its share of the queue); the clock."""
    inflight_gauge().set(len(rows))
    return time.perf_counter()


def generated(rows: list[dict], started: float) -> None:
    """After a generate call: its time, and the tokens of the rows it answered."""
    generate_histogram().observe(time.perf_counter() - started)
    inflight_gauge().set(0)
    for kind in ("prompt", "output"):
        counts = [r[f"{kind}_tokens"] for r in rows if r.get(f"{kind}_tokens")]
        for n in counts:
            tokens_histogram().observe(n, tags={"kind": kind})
        if counts:
            tokens_counter().inc(sum(counts), tags={"kind": kind})


def rows_written(statuses: list[str], error_types: list[str | None]) -> None:
    """Output rows by status and error_type ("" for ok rows)."""
    for (status, error_type), n in Counter(zip(statuses, error_types)).items():
        rows_counter().inc(n, tags={"status": status, "error_type": error_type or ""})


def quality(flags: list[list[str] | None], finish_reasons: list[str | None]) -> None:
    """Output rows' quality flags and finish reasons (format_output; None: an error row)."""
    generated = [f for f in flags if f is not None]
    for flagged, n in Counter(bool(f) for f in generated).items():
        generated_rows_counter().inc(n, tags={"flagged": str(flagged).lower()})
    for flag, n in Counter(f for fs in generated for f in fs).items():
        quality_flags_counter().inc(n, tags={"flag": flag})
    for reason, n in Counter(r for r in finish_reasons if r).items():
        finish_reasons_counter().inc(n, tags={"reason": reason})


# --- the online server (pipeline/serve) ------------------------------------------------------------

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


def serve_requests_counter():
    return _metric("counter", "pipeline_serve_requests", "Online requests answered, by route, HTTP status and stream.",
                   ("route", "status", "stream"))


def serve_ttft_histogram():
    return _metric("histogram", "pipeline_serve_time_to_first_token_seconds",
                   "Online requests: from arrival to the first generated text (streamed or not).",
                   ("stream",), tuple(SECONDS_BOUNDARIES))


def serve_tokens_counter():
    return _metric("counter", "pipeline_serve_tokens", "Online tokens, by kind (prompt or output).", ("kind",))


def serve_batch_histogram():
    return _metric("histogram", "pipeline_serve_batch_size", "Requests per generate batch of a model replica.",
                   (), tuple(BATCH_BOUNDARIES))


def serve_queue_wait_histogram():
    return _metric("histogram", "pipeline_serve_queue_wait_seconds",
                   "Online requests: wait in a model replica until their batch starts.", (), tuple(SECONDS_BOUNDARIES))


def serve_request(route: str, status: int, stream: bool) -> None:
    serve_requests_counter().inc(tags={"route": route, "status": str(status), "stream": str(stream).lower()})


def serve_first_token(seconds: float, stream: bool) -> None:
    serve_ttft_histogram().observe(seconds, tags={"stream": str(stream).lower()})


def serve_tokens(prompt_tokens: int, completion_tokens: int) -> None:
    serve_tokens_counter().inc(prompt_tokens, tags={"kind": "prompt"})
    if completion_tokens:
        serve_tokens_counter().inc(completion_tokens, tags={"kind": "output"})


def serve_batch(size: int, queue_waits: list[float]) -> None:
    serve_batch_histogram().observe(size)
    for wait in queue_waits:
        serve_queue_wait_histogram().observe(wait)
