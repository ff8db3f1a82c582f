"""Turn a run's output table into a static HTML page: sampled frames beside captions/answers,
error rows grouped by type, the run's figures.

    python jobs/report.py --input s3://bucket/captions/ --output report.html --allow-uri-prefix s3://bucket/media/ [--run-id RUN_ID]

One committed run per page: the last one by default, or the one --run-id names (its ledger,
OUTPUT/_runs/RUN_ID.json, lists its files; the runs are the names in that folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `pipeline` without installing

from pipeline.config import StorageConfig  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="The run's --output (a Parquet dataset; local, s3://, any fsspec URI).")
    p.add_argument("--output", required=True, help="The HTML file to write (local path).")
    p.add_argument("--run-id", help="The committed run to show (a name in INPUT/_runs/). Default: the last committed run.")
    p.add_argument("--max-items", type=int, default=500, help="Most items (and error rows per type) on the page.")
    p.add_argument("--no-frames", action="store_true", help="Leave out the frame strips (no media reads).")
    p.add_argument("--allow-uri-prefix", action="append", default=[], metavar="PREFIX",
                   help="Where the media whose frames are shown may be read (the run's --allow-uri-prefix, or its "
                        "manifest's bucket or folder); repeat for several. Without it (or --frames-from-ledger) no "
                        "media is read.")
    p.add_argument("--frames-from-ledger", action="store_true",
                   help="Read frames under the URL rules the run's ledger records: only for outputs that nobody "
                        "but trusted runs can write (anyone who can write to the output can rewrite its ledger).")
    p.add_argument("--s3-endpoint-url", help=StorageConfig.model_fields["endpoint_url"].description)
    a = p.parse_args(argv)
    from pipeline.output.report import read_output, render

    storage = StorageConfig(endpoint_url=a.s3_endpoint_url)
    try:
        rows, success = read_output(a.input, storage, a.run_id)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"cannot read the output table {a.input}: {e}", file=sys.stderr)
        return 2
    Path(a.output).write_text(render(rows, success, storage, frames=not a.no_frames, max_items=a.max_items,
                                     allowed_prefixes=a.allow_uri_prefix, trust_ledger=a.frames_from_ledger))
    print(f"wrote {a.output}: {len(rows)} rows of run {success['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
