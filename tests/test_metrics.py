"""The stages record their metrics: a plain-Python run of the real stages, with Ray's metric objects
wrapped to remember what they were given."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import metrics
from pipeline.batch.stages import Generate, Preprocess, decode_media, format_output
from pipeline.config import GenerationConfig, RunConfig
from pipeline.planning.manifest import scan_manifest

REPO = Path(__file__).resolve().parents[1]


class Recording:
    """A real ray.util.metrics object (name, tags and boundaries checked by Ray) that also keeps its records."""

    def __init__(self, metric):
        self.metric, self.records = metric, []

    def __getattr__(self, method):
        def record(value=1.0, tags=None):
            getattr(self.metric, method)(value, tags=tags)
            self.records.append((method, value, dict(tags or {})))
        return record


@pytest.fixture(scope="module")
def recorded(samples, tiny_model):
    made = {}
    real = metrics._metric.__wrapped__

    def recording(kind, name, *args, **kwargs):
        if (kind, name) not in made:
            made[(kind, name)] = Recording(real(kind, name, *args, **kwargs))
        return made[(kind, name)]

    mp = pytest.MonkeyPatch()
    mp.setattr(metrics, "_metric", recording)
    cfg = RunConfig(manifest=str(samples / "manifest.jsonl"), output="/unused", model=str(tiny_model),
                    num_frames=3, generation=GenerationConfig(max_new_tokens=4))
    scan = scan_manifest(cfg)
    records = scan.records
    items = pa.concat_tables([decode_media(records.slice(i, 1), cfg, prefixes=scan.prefixes) for i in range(records.num_rows)])
    requests = Preprocess(cfg)(items)
    generate = Generate(cfg, device="cpu")
    out = pa.concat_tables([format_output(generate(requests.slice(i, 3)), cfg) for i in range(0, requests.num_rows, 3)])
    mp.undo()
    return {name: m.records for (_, name), m in made.items()}, out


def test_rows_by_status_and_error_type(recorded):
    rec, out = recorded
    counted = Counter()
    for method, value, tags in rec["pipeline_rows"]:
        assert method == "inc"
        counted[(tags["status"], tags["error_type"])] += value
    expected = Counter((r["status"], r["error_type"] or "") for r in out.to_pylist())
    assert counted == expected and expected[("error", "not_found")] == 1 and expected[("ok", "")] == 6


def test_decode_seconds_per_item(recorded, samples):
    rec, _ = recorded
    obs = rec["pipeline_decode_seconds"]
    items = len((samples / "manifest.jsonl").read_text().splitlines())
    assert len(obs) == items and all(m == "observe" and v > 0 for m, v, _ in obs)
    by = Counter((t["media_type"], t["status"]) for _, _, t in obs)
    assert by[("video", "ok")] == 3 and by[("image", "ok")] == 3 and sum(v for k, v in by.items() if k[1] == "error") == 1


def test_generate_seconds_tokens_and_inflight(recorded):
    rec, out = recorded
    ok = [r for r in out.to_pylist() if r["status"] == "ok"]
    calls = rec["pipeline_generate_seconds"]
    statuses = out.column("status").to_pylist()
    batches_with_work = sum("ok" in statuses[i:i + 3] for i in range(0, len(statuses), 3))
    assert len(calls) == batches_with_work == 2 and all(v > 0 for _, v, _ in calls)  # the error-only batch skips generate
    totals = defaultdict(float)
    for method, value, tags in rec["pipeline_tokens"]:
        assert method == "inc"
        totals[tags["kind"]] += value
    assert totals == {"prompt": sum(r["prompt_tokens"] for r in ok), "output": sum(r["output_tokens"] for r in ok)}
    per_row = [v for m, v, t in rec["pipeline_row_tokens"] if m == "observe" and t["kind"] == "output"]
    assert sorted(per_row) == sorted(r["output_tokens"] for r in ok)
    gauge = [v for _, v, _ in rec["pipeline_generate_inflight_rows"]]
    assert max(gauge) == 3 and gauge[-1] == 0 and gauge[::2] != gauge[1::2]


def test_quality_flags_and_finish_reasons_count_the_rows_written(recorded):
    rec, out = recorded
    ok = [r for r in out.to_pylist() if r["status"] == "ok"]
    flags, reasons = Counter(), Counter()
    for method, value, tags in rec["pipeline_quality_flags"]:
        assert method == "inc"
        flags[tags["flag"]] += value
    for method, value, tags in rec["pipeline_finish_reasons"]:
        reasons[tags["reason"]] += value
    assert flags == Counter(f for r in ok for f in r["quality_flags"]) and flags["truncated"] == len(ok)  # 4 tokens: all cut
    assert reasons == Counter(r["finish_reason"] for r in ok) == {"length": len(ok)}
    assert sum(v for _, v, _ in rec["pipeline_generated_rows"]) == len(ok)


def test_grafana_dashboard_queries_the_recorded_metrics():
    dashboard = json.loads((REPO / "cluster" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for name in ("ray_pipeline_rows_total", "ray_pipeline_decode_seconds_bucket", "ray_pipeline_generate_seconds_bucket",
                 "ray_pipeline_tokens_total", "ray_pipeline_generate_inflight_rows", "ray_pipeline_replica_failures_total",
                 "ray_pipeline_quality_flags_total", "ray_pipeline_finish_reasons_total", "ray_pipeline_generated_rows_total"):
        assert name in exprs
    made = {m for m in dir(metrics) if m.endswith(("_counter", "_histogram", "_gauge"))}
    assert len(made) == 15  # 10 of the batch job, 5 of the online server (tests/test_serve.py checks those)


def test_metrics_reach_the_nodes_prometheus_endpoint(ray_local, samples, tiny_model, tmp_path):
    """A real run on the local Ray node, then Prometheus' view: Ray's metrics export port."""
    from conftest import scrape_until
    from test_job import run_job

    assert run_job("--manifest", samples / "manifest.jsonl", "--output", tmp_path, "--model", tiny_model,
                   "--max-new-tokens", 2, "--num-frames", 2) == 0
    lines = scrape_until(ray_local, {"ray_pipeline_rows_total", "ray_pipeline_decode_seconds_count",
                                     "ray_pipeline_generate_seconds_count", "ray_pipeline_tokens_total",
                                     "ray_pipeline_quality_flags_total", "ray_pipeline_finish_reasons_total"})
    assert any(line.startswith("ray_pipeline_quality_flags_total") and 'flag="truncated"' in line for line in lines)
    rows = [line for line in lines if line.startswith("ray_pipeline_rows_total")
            and 'error_type="not_found"' in line]
    assert rows and float(rows[0].rsplit(" ", 1)[1]) >= 1
