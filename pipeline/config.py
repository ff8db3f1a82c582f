"""Run configuration: one pydantic model, built once from the command line and passed to every stage."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field, model_validator

DEFAULT_PROMPTS = {
    "video": "Describe this video in detail.",
    "image": "Describe this image in detail.",
}


class GenerationConfig(BaseModel):
    """How text is generated. Greedy unless temperature > 0."""

    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per answer.")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding; > 0 samples.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (sampling only).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 keeps all (sampling only).")
    seed: int = Field(0, description="Sampling seed; each (id, prompt) gets its own stream, so results do not depend on batching.")


class StorageConfig(BaseModel):
    """Object-store settings. Credentials always come from the standard AWS chain, never from here."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, moto, ...). Defaults to $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL.",
    )

    @model_validator(mode="after")
    def _endpoint_from_env(self):
        if self.endpoint_url is None:
            self.endpoint_url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return self

    def fsspec_options(self, protocol: str) -> dict:
        if protocol in ("s3", "s3a") and self.endpoint_url:
            return {"client_kwargs": {"endpoint_url": self.endpoint_url}}
        return {}


class ModelSettings(BaseModel):
    """How the model runs: shared by the batch job (RunConfig) and the online server (ServeConfig)."""

    model: str = Field(description="Model: a hub id, a local folder, or an s3:// prefix.")
    num_frames: int = Field(8, ge=1, le=256, description="Frames sampled uniformly over each video's clip window.")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest image or video frame (width x height) decoded; larger media become `too_large` rows, judged from the header.")
    decode_timeout_s: float = Field(120.0, gt=0, description="Longest time one item may take to fetch and decode before it becomes a `timeout` row.")
    decoder_module: str = Field("pipeline.decoder_process", description="Module run (python -m) as the isolated decoder process; tests swap in one that injects faults.")
    batch_size: int = Field(4, ge=1, description="Model inputs per generate call.")
    replicas: int = Field(1, ge=1, description="Model replicas (generate actors) running side by side.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the cluster has GPUs, else cpu.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="auto: bfloat16 on GPU, float32 on CPU.")
    attn_implementation: str = Field("sdpa", description="Attention kernel passed to transformers.")
    dry_run: bool = Field(False, description="Only check config, manifest, model location and output write access; load no model, run nothing.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)


class RunConfig(ModelSettings):
    """Everything one run needs. Stages receive this object (it pickles) and read what they use."""

    manifest: str = Field(description="Manifest file or prefix (JSONL, CSV or Parquet; any fsspec URI).")
    output: str = Field(description="Output prefix for the Parquet dataset (any fsspec URI).")
    task: Literal["caption", "qa"] = Field("caption", description="caption: one row per item; qa: one row per question.")
    prompt: str | None = Field(None, description="Default instruction (caption) or question (qa) for rows without their own.")
    preprocess_workers: int = Field(2, ge=1, description="Most decode + preprocess actors (each holds one HF processor); the pool grows to this while the model keeps up.")
    resize_in_decoder: bool = Field(True, description="Resize video frames to the video processor's size inside the decoder process, with the processor's own resize (bit-identical model inputs): only small frames travel to the preprocess stage.")
    model_cpu_threads: int = Field(0, ge=0, description="Torch threads of each model actor when the model runs on the CPU; 0: as Ray sets them (one per CPU the actor holds). More threads help on an otherwise idle CPU node (+58 % measured) and hurt badly when its cores are oversubscribed.")
    trace_dir: str | None = Field(None, description="Local folder where each model actor appends one JSON line per generate call (start, end, rows); for benchmarks and profiling.")
    run_id: str = Field(
        default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8],
        description="Identifies this run in every output row.",
    )

    def default_prompt(self, media_type: str | None) -> str:
        return self.prompt or DEFAULT_PROMPTS.get(media_type or "video", DEFAULT_PROMPTS["video"])
