r"""Caption videos and images, or answer questions about them, for every row of a manifest.

    ray job submit --working-dir . -- python jobs/caption_videos.py \
        --manifest s3://bucket/manifests/ --output s3://bucket/captions/ \
        --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf

Models: LLaVA-OneVision (ov and si), LLaVA-Interleave-Qwen and LLaVA-1.5 checkpoints in transformers
format (the family is read from the checkpoint's config); a hub id, a local folder or an s3:// prefix.
Rows may list several images (`uris`) for OneVision and Interleave; LLaVA-1.5 takes one image per
prompt, so its video and `uris` rows become `unsupported_media` error rows.

Also runs with plain `python` (it then joins the local Ray cluster or starts one).
A sizing plan (tp, replicas, batch budget for the cluster's GPUs) is logged before the run; for
example LLaVA-OneVision 72B on 8x 80 GB GPUs: --tp 4 --replicas 2 (`python -m pipeline.planning.sizing`).
Exit code 0 when the run completed, error rows included; non-zero when it could not complete.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `pipeline` without installing

from pipeline import cli  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402


def parser() -> argparse.ArgumentParser:
    """The job's flags: one per RunConfig field, generated from it (pipeline/cli.py)."""
    return cli.parser_for(RunConfig, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_args(argv=None) -> RunConfig:
    return cli.parse(parser(), RunConfig, argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    if cfg.dry_run:
        from pipeline.batch.preflight import PreflightError, preflight

        try:
            print(preflight(cfg).line())
        except PreflightError as e:
            print(f"dry run failed: {e}", file=sys.stderr)
            return 2
        return 0
    from pipeline.batch.run import RunError, run
    from pipeline.model.checkpoint import is_random_weight
    from pipeline.planning.manifest import ManifestError

    if is_random_weight(cfg.model):
        print(f"NOTE: {cfg.model} has RANDOM WEIGHTS: its text is noise. "
              "For real captions use --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf (or a local or s3:// copy).")
    try:
        summary = run(cfg)
    except (ManifestError, RunError) as e:
        print(f"run could not start: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
