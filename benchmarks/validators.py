"""The manifest scan's deliberate twins, side by side: rows validated as a table at once (pyarrow's
JSON reader, `manifest._plain_rows`, `urls.media_uris_surely_allowed`) against the same rows through
the per-row path they stand in for (json.loads, `validate_row`, `check_media_uri`), on one generated
manifest, with the records compared. The twins are kept while the ratio is well above 1.

    python -m benchmarks.validators --out benchmarks/results/validators.json [--rows 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from unittest import mock


def write_manifest(path: Path, rows: int, bad_fraction: float, seed: int = 22) -> None:
    """Rows as real manifests hold them: ids, s3 and local media, prompts, clip windows, and a share
    of rows that are wrong in one way or another (bad JSON, a wrong type, a missing uri, ...)."""
    rng = random.Random(seed)
    bad = ['{"id": "x", "uri": 3}', "{not json", '{"id": "y"}', '{"id": "z", "uri": "s3://other/a.mp4"}',
           '{"id": "w", "uri": "s3://b/a.mp4", "start_s": 5, "end_s": 1}']
    with open(path, "w") as f:
        for i in range(rows):
            if rng.random() < bad_fraction:
                f.write(rng.choice(bad) + "\n")
                continue
            row = {"id": f"v{i}", "uri": rng.choice([f"s3://b/videos/{i}.mp4", f"{path.parent}/media/{i}.jpg"])}
            if rng.random() < 0.3:
                row["prompt"] = "Describe the camera motion."
            if rng.random() < 0.2:
                row.update(start_s=1.0, end_s=4.5)
            f.write(json.dumps(row) + "\n")


def scan(manifest: Path, per_row: bool) -> tuple[float, list]:
    import numpy as np
    import pyarrow as pa

    from pipeline.config import RunConfig
    from pipeline.planning import manifest as mf

    cfg = RunConfig(manifest=str(manifest), output=str(manifest.parent / "out"), model="unused",
                    allowed_uri_prefixes=["s3://b/", f"{manifest.parent}/media/"])
    patches = []
    if per_row:  # what the table path stands in for: every row by json, validate_row, check_media_uri
        patches = [mock.patch.object(mf, "_plain_rows", lambda t, c: np.zeros(t.num_rows, dtype=bool)),
                   mock.patch("pipeline.io.urls.media_uris_surely_allowed", lambda u, p: np.zeros(len(u), dtype=bool)),
                   mock.patch("pyarrow.json.read_json", side_effect=pa.ArrowInvalid("per-row path"))]
    for p in patches:
        p.start()
    try:
        started = time.perf_counter()
        records = mf.scan_manifest(cfg).records
        elapsed = time.perf_counter() - started
    finally:
        for p in patches:
            p.stop()
    keep = [c for c in records.column_names if c != "_order"]
    return elapsed, records.select(keep).to_pylist()


def compare(rows: int, bad_fraction: float, repeats: int, work: Path) -> dict:
    manifest = work / f"manifest-{bad_fraction}.jsonl"
    write_manifest(manifest, rows, bad_fraction)
    table_s, per_row_s = [], []
    for _ in range(repeats):  # alternated, so a load change on the machine hits both
        t, table_records = scan(manifest, per_row=False)
        table_s.append(t)
        t, row_records = scan(manifest, per_row=True)
        per_row_s.append(t)
    best_table, best_row = min(table_s), min(per_row_s)
    return {"rows": rows, "bad_fraction": bad_fraction, "table_s": round(best_table, 3), "per_row_s": round(best_row, 3),
            "table_rows_per_s": round(rows / best_table), "per_row_rows_per_s": round(rows / best_row),
            "table_vs_per_row_speedup": round(best_row / best_table, 2), "same_records": table_records == row_records,
            "error_rows": sum(r["status"] == "error" for r in table_records)}


def run(rows: int, repeats: int = 2, bad_fractions=(0.0, 0.0001, 0.004)) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        warm = work / "warm.jsonl"
        write_manifest(warm, 1000, 0.01)
        scan(warm, per_row=False), scan(warm, per_row=True)  # imports and first-call costs, outside the figures
        cases = [compare(rows, f, repeats, work) for f in bad_fractions]
    return {"cases": cases, "table_vs_per_row_speedup_clean": cases[0]["table_vs_per_row_speedup"],
            "same_records": all(c["same_records"] for c in cases), "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.validators", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--rows", type=int, default=200_000, help="manifest rows generated and scanned both ways")
    p.add_argument("--repeats", type=int, default=2, help="scans each way (the fastest counts)")
    a = p.parse_args(argv)
    result = {"command": f"python -m benchmarks.validators --out {a.out} --rows {a.rows}", **run(a.rows, a.repeats)}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if result["same_records"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
