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

from pydantic import ValidationError  # noqa: E402

from pipeline.config import GenerationConfig, RunConfig, StorageConfig  # noqa: E402


def doc(field) -> str:
    """A config field's description as argparse help (argparse %-formats help: '40 %' must be '40 %%')."""
    return field.description.replace("%", "%%")


def parse_args(argv=None) -> RunConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f = RunConfig.model_fields
    g = GenerationConfig.model_fields
    p.add_argument("--manifest", required=True, help=doc(f["manifest"]))
    p.add_argument("--output", required=True, help=doc(f["output"]))
    p.add_argument("--model", required=True, help=doc(f["model"]))
    p.add_argument("--task", choices=["caption", "qa"], default="caption", help=doc(f["task"]))
    p.add_argument("--prompt", help=doc(f["prompt"]) + " Default: 'Describe this video/image in detail.'")
    p.add_argument("--num-frames", type=int, default=f["num_frames"].default, help=doc(f["num_frames"]))
    p.add_argument("--max-new-tokens", type=int, default=g["max_new_tokens"].default, help=doc(g["max_new_tokens"]))
    p.add_argument("--batch-size", type=int, default=f["batch_size"].default, help=doc(f["batch_size"]))
    p.add_argument("--replicas", type=int, default=f["replicas"].default, help=doc(f["replicas"]))
    p.add_argument("--tp", type=int, default=f["tp"].default, help=doc(f["tp"]) + " GPUs used: tp x replicas.")
    p.add_argument("--replica-timeout-s", type=float, default=f["replica_timeout_s"].default,
                   help=doc(f["replica_timeout_s"]))
    p.add_argument("--replica-restarts", type=int, default=f["replica_restarts"].default,
                   help=doc(f["replica_restarts"]))
    p.add_argument("--gpu-memory-gb", type=float, help=doc(f["gpu_memory_gb"]))
    p.add_argument("--accelerator-type", help=doc(f["accelerator_type"]))
    p.add_argument("--preprocess-workers", type=int, default=f["preprocess_workers"].default,
                   help=doc(f["preprocess_workers"]))
    p.add_argument("--output-file-rows", type=int, default=f["output_file_rows"].default, help=doc(f["output_file_rows"]))
    p.add_argument("--resize-in-decoder", action=argparse.BooleanOptionalAction, default=f["resize_in_decoder"].default,
                   help=doc(f["resize_in_decoder"]))
    p.add_argument("--model-cpu-threads", type=int, default=f["model_cpu_threads"].default,
                   help=doc(f["model_cpu_threads"]))
    p.add_argument("--temperature", type=float, default=g["temperature"].default, help=doc(g["temperature"]))
    p.add_argument("--top-p", type=float, default=g["top_p"].default, help=doc(g["top_p"]))
    p.add_argument("--top-k", type=int, default=g["top_k"].default, help=doc(g["top_k"]))
    p.add_argument("--seed", type=int, default=g["seed"].default, help=doc(g["seed"]))
    p.add_argument("--repetition-penalty", type=float, default=g["repetition_penalty"].default, help=doc(g["repetition_penalty"]))
    p.add_argument("--no-repeat-ngram-size", type=int, default=g["no_repeat_ngram_size"].default,
                   help=doc(g["no_repeat_ngram_size"]))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help=doc(f["device"]))
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help=doc(f["dtype"]))
    p.add_argument("--attn-implementation", choices=["sdpa", "flash_attention_2", "eager"],
                   default=f["attn_implementation"].default, help=doc(f["attn_implementation"]))
    p.add_argument("--quantization", choices=["4bit", "8bit"], help=doc(f["quantization"]))
    p.add_argument("--revision", help=doc(f["revision"]))
    p.add_argument("--trust-remote-code", action="store_true", help=doc(f["trust_remote_code"]))
    p.add_argument("--decode-timeout-s", type=float, default=f["decode_timeout_s"].default,
                   help=doc(f["decode_timeout_s"]))
    p.add_argument("--max-pixels", type=int, default=f["max_pixels"].default, help=doc(f["max_pixels"]))
    p.add_argument("--decoder-memory-gb", type=float, default=f["decoder_memory_gb"].default,
                   help=doc(f["decoder_memory_gb"]))
    p.add_argument("--decoder-module", default=f["decoder_module"].default, help=doc(f["decoder_module"]))
    p.add_argument("--allow-uri-prefix", action="append", default=[], metavar="PREFIX",
                   help=doc(f["allowed_uri_prefixes"]) + " Repeat for several; replaces the default.")
    p.add_argument("--s3-endpoint-url", help=doc(StorageConfig.model_fields["endpoint_url"]))
    p.add_argument("--address", help=doc(f["ray_address"]))
    p.add_argument("--run-id", help="Identifier of this run (default: UTC time + random suffix).")
    p.add_argument("--retry-errors", action="store_true", help=doc(f["retry_errors"]))
    p.add_argument("--retry-flagged", default="", metavar="FLAG,...", help=doc(f["retry_flagged"]))
    p.add_argument("--model-resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help=doc(f["model_resources"]) + " Repeat for several.")
    p.add_argument("--trace-dir", help=doc(f["trace_dir"]))
    p.add_argument("--lease-ttl-s", type=float, default=f["lease_ttl_s"].default, help=doc(f["lease_ttl_s"]))
    p.add_argument("--dry-run", action="store_true", help=doc(f["dry_run"]))
    a = p.parse_args(argv)
    try:
        return RunConfig(
            manifest=a.manifest, output=a.output, model=a.model, task=a.task, prompt=a.prompt,
            num_frames=a.num_frames, batch_size=a.batch_size, replicas=a.replicas, tp=a.tp,
            replica_timeout_s=a.replica_timeout_s, replica_restarts=a.replica_restarts, gpu_memory_gb=a.gpu_memory_gb,
            accelerator_type=a.accelerator_type,
            preprocess_workers=a.preprocess_workers, output_file_rows=a.output_file_rows, resize_in_decoder=a.resize_in_decoder,
            model_cpu_threads=a.model_cpu_threads, allowed_uri_prefixes=a.allow_uri_prefix, device=a.device, dtype=a.dtype,
            attn_implementation=a.attn_implementation, quantization=a.quantization, revision=a.revision,
            trust_remote_code=a.trust_remote_code, ray_address=a.address, dry_run=a.dry_run, retry_errors=a.retry_errors,
            retry_flagged=a.retry_flagged,
            decode_timeout_s=a.decode_timeout_s, decoder_module=a.decoder_module, max_pixels=a.max_pixels,
            decoder_memory_gb=a.decoder_memory_gb, lease_ttl_s=a.lease_ttl_s,
            model_resources=dict(_resource(r, p) for r in a.model_resource), trace_dir=a.trace_dir,
            generation=GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                        top_p=a.top_p, top_k=a.top_k, seed=a.seed,
                                        repetition_penalty=a.repetition_penalty, no_repeat_ngram_size=a.no_repeat_ngram_size),
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
