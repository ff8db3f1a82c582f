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
example LLaVA-OneVision 72B on 8x 80 GB GPUs: --tp 4 --replicas 2 (`python -m pipeline.sizing`).
Exit code 0 when the run completed, error rows included; non-zero when it could not complete.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `pipeline` without installing

from pydantic import ValidationError  # noqa: E402

from pipeline.config import GenerationConfig, RunConfig, StorageConfig  # noqa: E402


def parse_args(argv=None) -> RunConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f = RunConfig.model_fields
    g = GenerationConfig.model_fields
    p.add_argument("--manifest", required=True, help=f["manifest"].description)
    p.add_argument("--output", required=True, help=f["output"].description)
    p.add_argument("--model", required=True, help=f["model"].description)
    p.add_argument("--task", choices=["caption", "qa"], default="caption", help=f["task"].description)
    p.add_argument("--prompt", help=f["prompt"].description + " Default: 'Describe this video/image in detail.'")
    p.add_argument("--num-frames", type=int, default=f["num_frames"].default, help=f["num_frames"].description)
    p.add_argument("--max-new-tokens", type=int, default=g["max_new_tokens"].default, help=g["max_new_tokens"].description)
    p.add_argument("--batch-size", type=int, default=f["batch_size"].default, help=f["batch_size"].description)
    p.add_argument("--replicas", type=int, default=f["replicas"].default, help=f["replicas"].description)
    p.add_argument("--tp", type=int, default=f["tp"].default, help=f["tp"].description + " GPUs used: tp x replicas.")
    p.add_argument("--replica-timeout-s", type=float, default=f["replica_timeout_s"].default,
                   help=f["replica_timeout_s"].description)
    p.add_argument("--replica-restarts", type=int, default=f["replica_restarts"].default,
                   help=f["replica_restarts"].description)
    p.add_argument("--gpu-memory-gb", type=float, help=f["gpu_memory_gb"].description)
    p.add_argument("--preprocess-workers", type=int, default=f["preprocess_workers"].default,
                   help=f["preprocess_workers"].description)
    p.add_argument("--resize-in-decoder", action=argparse.BooleanOptionalAction, default=f["resize_in_decoder"].default,
                   help=f["resize_in_decoder"].description)
    p.add_argument("--model-cpu-threads", type=int, default=f["model_cpu_threads"].default,
                   help=f["model_cpu_threads"].description)
    p.add_argument("--temperature", type=float, default=g["temperature"].default, help=g["temperature"].description)
    p.add_argument("--top-p", type=float, default=g["top_p"].default, help=g["top_p"].description)
    p.add_argument("--top-k", type=int, default=g["top_k"].default, help=g["top_k"].description)
    p.add_argument("--seed", type=int, default=g["seed"].default, help=g["seed"].description)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help=f["device"].description)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help=f["dtype"].description)
    p.add_argument("--attn-implementation", choices=["sdpa", "flash_attention_2", "eager"],
                   default=f["attn_implementation"].default, help=f["attn_implementation"].description)
    p.add_argument("--quantization", choices=["4bit", "8bit"], help=f["quantization"].description)
    p.add_argument("--revision", help=f["revision"].description)
    p.add_argument("--trust-remote-code", action="store_true", help=f["trust_remote_code"].description)
    p.add_argument("--decode-timeout-s", type=float, default=f["decode_timeout_s"].default,
                   help=f["decode_timeout_s"].description)
    p.add_argument("--decoder-module", default=f["decoder_module"].default, help=f["decoder_module"].description)
    p.add_argument("--allow-uri-prefix", action="append", default=[], metavar="PREFIX",
                   help=f["allowed_uri_prefixes"].description + " Repeat for several; replaces the default.")
    p.add_argument("--s3-endpoint-url", help=StorageConfig.model_fields["endpoint_url"].description)
    p.add_argument("--address", help=f["ray_address"].description)
    p.add_argument("--run-id", help="Identifier of this run (default: UTC time + random suffix).")
    p.add_argument("--retry-errors", action="store_true", help=f["retry_errors"].description)
    p.add_argument("--model-resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help=f["model_resources"].description + " Repeat for several.")
    p.add_argument("--trace-dir", help=f["trace_dir"].description)
    p.add_argument("--lease-ttl-s", type=float, default=f["lease_ttl_s"].default, help=f["lease_ttl_s"].description)
    p.add_argument("--dry-run", action="store_true", help=f["dry_run"].description)
    a = p.parse_args(argv)
    try:
        return RunConfig(
            manifest=a.manifest, output=a.output, model=a.model, task=a.task, prompt=a.prompt,
            num_frames=a.num_frames, batch_size=a.batch_size, replicas=a.replicas, tp=a.tp,
            replica_timeout_s=a.replica_timeout_s, replica_restarts=a.replica_restarts, gpu_memory_gb=a.gpu_memory_gb,
            preprocess_workers=a.preprocess_workers, resize_in_decoder=a.resize_in_decoder,
            model_cpu_threads=a.model_cpu_threads, allowed_uri_prefixes=a.allow_uri_prefix, device=a.device, dtype=a.dtype,
            attn_implementation=a.attn_implementation, quantization=a.quantization, revision=a.revision,
            trust_remote_code=a.trust_remote_code, ray_address=a.address, dry_run=a.dry_run, retry_errors=a.retry_errors,
            decode_timeout_s=a.decode_timeout_s, decoder_module=a.decoder_module, lease_ttl_s=a.lease_ttl_s,
            model_resources=dict(_resource(r, p) for r in a.model_resource), trace_dir=a.trace_dir,
            generation=GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                        top_p=a.top_p, top_k=a.top_k, seed=a.seed),
            storage=StorageConfig(endpoint_url=a.s3_endpoint_url),
            **({"run_id": a.run_id} if a.run_id else {}),
        )
    except ValidationError as e:
        p.error(str(e))


def _resource(text: str, p: argparse.ArgumentParser) -> tuple[str, float]:
    name, _, amount = text.partition("=")
    try:
        return name, float(amount)
    except ValueError:
        p.error(f"--model-resource {text!r}: expected NAME=AMOUNT, e.g. llava_node=1")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    if cfg.dry_run:
        from pipeline.preflight import PreflightError, preflight

        try:
            print(preflight(cfg).line())
        except PreflightError as e:
            print(f"dry run failed: {e}", file=sys.stderr)
            return 2
        return 0
    from pipeline.checkpoint import is_random_weight
    from pipeline.manifest import ManifestError
    from pipeline.run import RunError, run

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
