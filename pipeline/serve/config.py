"""The server's settings: ServeConfig (the batch job's model settings plus serving, protection and
scaling), how `serve run ... key=value` arguments become one, and the API token it reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from pipeline.config import GenerationConfig, ModelSettings

TOKEN_ENV = "PIPELINE_API_TOKEN"


class ServeConfig(ModelSettings):
    """The server's settings: the batch job's model settings plus serving, protection and scaling.
    `batch_size` is the most requests per generate call; `replicas` the model replicas (the
    autoscaling minimum when max_replicas is larger)."""

    model_config = ConfigDict(extra="forbid")

    served_model_name: str | None = Field(None, description="Model id in /v1/models and responses; default: the model path's last part.")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description=
            "Longest wait for a batch to fill before generating (static scheduling; continuous rows join at the next step).")
    max_replicas: int | None = Field(None, ge=1, description="Autoscale model replicas between `replicas` and this (None: fixed `replicas`).")
    target_ongoing_requests: float | None = Field(None, gt=0, description="Autoscaling target per model replica (default: batch_size).")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per model replica (default: tp with device=cuda, else 0).")
    model_num_cpus: float = Field(1, ge=0, description="CPUs reserved per model replica.")
    frontend_replicas: int = Field(1, ge=1, description="Ingress replicas (HTTP + fetch/decode/preprocess).")
    frontend_num_cpus: float = Field(1, ge=0, description="CPUs reserved per ingress replica.")
    prepare_threads: int = Field(4, ge=1, description="Fetch/decode/preprocess threads per ingress replica.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one ingress replica works on at once.")
    max_queued_requests: int = Field(64, ge=1, description="Requests waiting for an ingress replica; more are answered 429.")
    request_timeout_s: float = Field(60, gt=0, description="A request not answered in this time gets 504.")
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="Largest request body; larger gets 413.")
    body_timeout_s: float = Field(30.0, gt=0, description=
            "Longest time a client may take to send its whole request body (and never past request_timeout_s); "
            "slower gets 408, so clients that trickle bytes cannot hold the server's request slots.")
    max_media_bytes: int = Field(200 * 2**20, ge=1024, description="Largest media file fetched from a URL; larger gets 413.")
    allowed_schemes: list[str] = Field(["data", "s3", "gs", "https"], description="URL schemes clients may name (file: and chained URLs never).")
    allowed_prefixes: list[str] = Field([], description=
            "Prefixes non-data URLs must start with, e.g. s3://bucket/media/ or https:// (none: data: only).")
    decode_timeout_s: float = Field(10.0, gt=0, description=
            "Longest fetch + decode of one media URL; the decoder child is then killed and the request gets 504. Below "
            "request_timeout_s, so media that decode slowly cannot hold the prepare threads for other requests' whole "
            "time.")
    decoder_memory_gb: float = Field(2.0, gt=0, description=
            "Memory (heap and anonymous mappings) each media decoder child may use (one per prepare thread); a file that "
            "needs more, or whose index declares more, is refused alone (400).")
    api_token_file: str | None = Field(None, description=
            f"File holding the bearer token (a mounted secret); default: ${TOKEN_ENV}; neither: the server refuses to start "
            f"unless allow_unauthenticated.")
    allow_unauthenticated: bool = Field(False, description=
            "Serve without a token (any client that reaches the port is served; a warning goes to the replica log). Off: "
            "no token means no start.")
    max_images_per_request: int = Field(8, ge=1, description="Most image_url parts in one request (all messages); more get 400.")
    max_prompt_tokens: int = Field(32768, ge=1, description="Longest prompt in tokens, media tokens included; longer gets 400 prompt_too_long.")

    @field_validator("allowed_schemes", "allowed_prefixes", mode="before")
    @classmethod
    def _comma_list(cls, v):
        return [p for p in v.split(",") if p] if isinstance(v, str) else v  # key=value on the command line

    @model_validator(mode="before")
    @classmethod
    def _generation_shortcuts(cls, data):
        """Accept max_new_tokens=... (and the other generation fields) at the top level, as the job's flags do."""
        if isinstance(data, dict):
            flat = {k: data.pop(k) for k in list(data) if k in GenerationConfig.model_fields}
            if flat:
                data["generation"] = {**dict(data.get("generation") or {}), **flat}
        return data

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model.rstrip("/")).name or self.model


def parse_args(args: dict[str, Any]) -> ServeConfig:
    """`serve run ... key=value` arguments (strings; dotted keys nest: storage.endpoint_url=...)."""
    nested: dict[str, Any] = {}
    for key, value in args.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return ServeConfig.model_validate(nested)


def load_token(cfg: ServeConfig) -> str | None:
    if cfg.api_token_file:
        token = Path(cfg.api_token_file).read_text().strip()
        if not token:
            raise ValueError(f"api_token_file {cfg.api_token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None
