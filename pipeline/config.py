"""Configuration: pydantic models, built once (from the command line, or by a user of pipeline.caption) and passed to every stage.

ModelSettings (the model; shared with the server) <- CaptionConfig (what the stages need: the public API) <- RunConfig
(the batch job: manifest, output, lease). The job's flags are generated from RunConfig (pipeline/cli.py).
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

DEFAULT_PROMPTS = {
    "video": "Describe this video in detail.",
    "image": "Describe this image in detail.",
    "images": "Describe these images in detail.",  # a `uris` row with several images
}


class GenerationConfig(BaseModel):
    """How text is generated. Greedy unless temperature > 0."""

    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per answer.")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding; > 0 samples.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (sampling only).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 keeps all (sampling only).")
    seed: int = Field(0, description="Sampling seed; each (id, prompt) gets its own stream, so results do not depend on batching.")
    repetition_penalty: float = Field(1.0, gt=0.0, description=
            "Divide the scores of tokens already in the prompt or the answer by this (transformers' "
            "RepetitionPenaltyLogitsProcessor; CTRL's penalty): 1.0 is off, 1.1-1.3 fights loops.")
    no_repeat_ngram_size: int = Field(0, ge=0, description=
            "Never generate an n-gram of this many tokens twice (transformers' NoRepeatNGramLogitsProcessor); 0 is off.")

    def key_fields(self) -> dict:
        """The settings as the settings key (RunConfig.config_key) takes them: a setting added later counts
        only when it is not at its default, so outputs written before it existed keep their key."""
        fields = self.model_dump(mode="json")
        for name, default in _KEYED_WHEN_SET.items():
            if fields.get(name) == default:
                fields.pop(name)
        return fields


# Generation settings added after outputs were written: in the settings key only when set.
_KEYED_WHEN_SET = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}

QUALITY_FLAGS = ("empty", "truncated", "repetition", "length_outlier", "echo", "not_text")


class QualityConfig(BaseModel):
    """The thresholds of the quality flags (pipeline/quality/flags.py). Flags describe a row's text; they
    never change its status, and they are not part of the settings key (they do not shape the text)."""

    min_caption_words: int = Field(4, ge=0, description=
            "length_outlier: a caption (task caption) of fewer words; Cosmos Curator's bound (under 4). Answers (task qa) "
            "may be one word.")
    max_words: int = Field(1024, ge=1, description="length_outlier: a text of more words (Cosmos Curator's bound).")
    dominant_share: float = Field(0.5, gt=0, le=1, description=
            "repetition: one word (or token) is at least this share of the text's words (tokens); Cosmos Curator's 50 %.")
    dominant_min_units: int = Field(8, ge=1, description="repetition: the dominant-unit and unique-ratio rules need this many words (tokens).")
    ngram_words: int = Field(4, ge=1, description=
            "repetition: length of the word n-grams counted (4: a 3-gram such as 'in the background' recurs in honest "
            "long captions).")
    ngram_tokens: int = Field(6, ge=1, description="repetition: length of the token n-grams counted (about 4 words).")
    ngram_max_count: int = Field(3, ge=2, description="repetition: an n-gram seen this many times (Cosmos Curator: a trigram 3 times).")
    min_unique_ratio: float = Field(0.3, ge=0, le=1, description=
            "repetition: distinct words (tokens) over all of them, in the last `unique_window` of the text, below this. "
            "Under Cosmos Curator's 0.4: honest English of 200 words has about 0.5.")
    unique_window: int = Field(200, ge=1, description="repetition: the unique ratio is taken over at most this many last words (tokens).")
    loop_max_period: int = Field(16, ge=1, description="repetition: longest unit sequence (words, tokens) a suffix loop repeats.")
    loop_min_repeats: int = Field(3, ge=2, description="repetition: a suffix loop is its period repeated this many times back to back...")
    loop_min_units: int = Field(8, ge=1, description="repetition: ...covering at least this many words (tokens): 'very very very' is not a loop.")
    loop_min_chars: int = Field(12, ge=1, description=
            "repetition: a suffix loop of the text's non-space characters (repeated one more time than loop_min_repeats) "
            "covering at least this many characters ('unsunsunsuns').")
    echo_share: float = Field(0.8, gt=0, le=1, description=
            "echo: at least this share of the text's word bigrams occurs in the prompt (a one-word text is no echo).")
    not_text_share: float = Field(0.2, gt=0, le=1, description=
            "not_text: at least this share of the text's non-space characters are replacement characters (U+FFFD), "
            "private-use, surrogate or unassigned code points (any control character but tab, newline and CR: always).")
    not_text_chars: int = Field(3, ge=1, description=
            "not_text: ...or at least this many of them anywhere (honest text has none; a single U+FFFD at the end, a "
            "multi-byte character cut by max_new_tokens, is not counted).")
    min_letter_share: float = Field(0.25, ge=0, le=1, description=
            "not_text: a text of at least 8 non-space characters of which fewer than this share are letters (of any script).")
    same_text_min_media: int = Field(5, ge=2, description=
            "Run check: one text written for at least this many distinct media (a model that collapsed to one caption).")
    near_duplicate_jaccard: float = Field(0.9, gt=0, le=1, description=
            "Run check: consecutive clip windows of one video whose captions' word sets have at least this Jaccard "
            "similarity (Cosmos Curator's 0.9).")




class StorageConfig(BaseModel):
    """Object-store settings. Credentials always come from the standard AWS chain, never from here."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, moto, ...). Defaults to $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL.",
        json_schema_extra={"cli": {"flag": "--s3-endpoint-url"}},
    )

    max_attempts: int = Field(5, ge=1, description="Attempts per S3 request: throttling (503 SlowDown), 5xx and "
                                                 "connection errors are retried with exponential backoff.")
    connect_timeout_s: float = Field(10.0, gt=0, description="Longest wait to connect to a store or an http(s) media host.")
    read_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the next bytes of a read from a store or an http(s) media host.")

    @model_validator(mode="after")
    def _endpoint_from_env(self):
        if self.endpoint_url is None:
            self.endpoint_url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return self

    def fsspec_options(self, protocol: str) -> dict:
        if protocol not in ("s3", "s3a"):
            return {}
        # botocore's standard mode retries throttling, 5xx and connection errors with backoff
        # (storage.filesystem turns s3fs's own retry loop off: it would multiply the attempts).
        options = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": self.max_attempts},
                                     "connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s}}
        if self.endpoint_url:
            options["client_kwargs"] = {"endpoint_url": self.endpoint_url}
        return options


class ModelSettings(BaseModel):
    """How the model runs: shared by the batch job (RunConfig) and the online server (ServeConfig)."""

    model: str = Field(description="Model: a hub id, a local folder, or an s3:// prefix.")
    num_frames: int = Field(8, ge=1, le=256, description="Frames sampled uniformly over each video's clip window.")
    max_pixels: int = Field(40_000_000, ge=1, description=
            "Largest image or video frame (width x height) decoded; larger media become `too_large` rows, judged from the "
            "header and from every decoded frame.")
    decode_timeout_s: float = Field(120.0, gt=0, description="Longest time one item may take to fetch and decode before it becomes a `timeout` row.")
    decoder_memory_gb: float = Field(8.0, gt=0, description=
            "Memory (heap and anonymous mappings) the isolated decoder process may use; media that need more, or whose "
            "index declares more, become `too_large` rows.")
    batch_size: int = Field(4, ge=1, description="Model inputs per generate call.")
    replicas: int = Field(1, ge=1, description="Model replicas (generate actors) running side by side.")
    tp: int = Field(1, ge=1, description=
            "Tensor parallelism: devices per model replica (GPUs, or CPU processes on CPU), all on one node; the language "
            "model's weights are split across them.", json_schema_extra={"cli": {"help": "GPUs used: tp x replicas."}})
    replica_timeout_s: float = Field(600.0, gt=0, description=
            "Longest a tensor-parallel replica may take to generate one batch; past it the replica counts as hung and is "
            "restarted (a rank that dies is noticed at once).")
    replica_restarts: int = Field(2, ge=0, description=
            "Restarts of a tensor-parallel replica for one batch after a rank died or hung; then the batch's rows become "
            "`model_error` rows.")
    gpu_memory_gb: float | None = Field(None, gt=0, description=
            "Memory of one GPU for the sizing plan (pipeline/planning/sizing.py); default: measured on a GPU of the "
            "cluster at run start.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the cluster has GPUs, else cpu.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="auto: bfloat16 on GPU, float32 on CPU.")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="Attention kernel: sdpa (PyTorch's), flash_attention_2 (CUDA + the flash-attn package) or eager.")
    quantization: Literal["4bit", "8bit"] | None = Field(
        None, description=
                "Load the model quantized with bitsandbytes (4-bit NF4 or 8-bit): less GPU memory; needs CUDA and the "
                "bitsandbytes package.")
    revision: str | None = Field(
        None, description=
                "Hub revision (branch, tag or commit) of a hub-id model, used for its weights, tokenizer and processor alike; "
                "pin a commit for reproducible runs.")
    trust_remote_code: bool = Field(
        False, description="Allow Python code shipped inside the checkpoint (auto_map) to run. Off: only transformers' own model classes load.")
    dry_run: bool = Field(False, description=
            "Only check config, manifest, model location and output write access, and plan the run (on Ray) to print how "
            "many items are already committed and how many it would do; load no model, read no media.")
    scheduling: Literal["continuous", "static"] = Field("continuous", description=
            "continuous: rows join and leave the model between decode steps (a row that ends frees its slot and cache "
            "at once; batch_size rows run at a time); static: one generate call per batch, every row held until the "
            "longest ends.")
    token_budget: int | None = Field(None, ge=1, description=
            "Tokens (prompt + max_new_tokens, padded) the running rows of one replica may hold under continuous "
            "scheduling; new rows wait while it is full. Default: the sizing plan's budget on a GPU, 65,536 on CPU.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="How text is generated.")
    # its flags: --s3-endpoint-url, --storage-max-attempts, ...
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object-store settings.",
                                   json_schema_extra={"cli": {"prefix": "storage-"}})

    @model_validator(mode="after")
    def _quantization_needs_cuda(self):
        if self.quantization and self.device == "cpu":
            raise ValueError(f"quantization {self.quantization} needs a CUDA GPU (bitsandbytes); drop it or use device cuda/auto")
        return self

    def load_options(self) -> dict:
        """How the Engine loads the model (beyond device, dtype and attention)."""
        return {"quantization": self.quantization, "revision": self.revision, "trust_remote_code": self.trust_remote_code,
                "scheduling": self.scheduling, "token_budget": self.token_budget, "max_rows": self.batch_size}


class CaptionConfig(ModelSettings):
    """What the stages need (pipeline.caption, the public API): the model settings plus the task, the
    prompts, where media may be and how the stages are sized. No manifest, output or lease: RunConfig
    adds those for the batch job. Stages receive this object (it pickles) and read what they use."""

    task: Literal["caption", "qa"] = Field("caption", description="caption: one row per item; qa: one row per question.")
    prompt: str | None = Field(None, description="Default instruction (caption) or question (qa) for rows without their own.",
                               json_schema_extra={"cli": {"help": "Default: " + ", ".join(
                                   f"{text!r} ({kind})" for kind, text in DEFAULT_PROMPTS.items()) + "."}})
    # Required here: there is no manifest to default from, and an empty list would either refuse every
    # row (a run of error rows) or, read as "anything", let a table's rows read any local file or host.
    allowed_uri_prefixes: list[str] = Field(
        min_length=1,
        description="Where media URIs may point (s3://bucket/prefix/, /local/folder/, https://host/path/); "
                    "others become `uri_not_allowed` rows before any I/O. At least one: there is no manifest "
                    "to take a default from.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="The quality flags' thresholds.",
                                   json_schema_extra={"cli": {"prefix": "quality-"}})
    accelerator_type: str | None = Field(None, description=
            "Run the model stage only on nodes with this accelerator (Ray's accelerator_type, e.g. L40S, A100, H100: the "
            "`accelerator_type:NAME` resource Ray gives GPU nodes): keeps a model's replicas, and the autoscaling they "
            "cause, on the node group meant for it.")
    preprocess_workers: int = Field(2, ge=1, description=
            "Most decode + preprocess actors (each holds one HF processor); the pool grows to this while the model keeps "
            "up.")
    resize_in_decoder: bool = Field(True, description=
            "Resize video frames to the video processor's size inside the decoder process, with the processor's own resize "
            "(bit-identical model inputs): only small frames travel to the preprocess stage.")
    model_cpu_threads: int = Field(0, ge=0, description=
            "Torch threads of each model actor when the model runs on the CPU; 0: as Ray sets them (one per CPU the actor "
            "holds). More threads help on an otherwise idle CPU node (+58 % measured) and hurt badly when its cores are "
            "oversubscribed.")
    model_resources: dict[str, float] = Field(default_factory=dict, description=
            "Custom Ray resources each model replica also requests, e.g. {\"llava_node\": 1}: places the replicas on nodes "
            "started with `ray start --resources` naming them.",
            json_schema_extra={"cli": {"flag": "--model-resource", "metavar": "NAME=AMOUNT", "help": "Repeat for several."}})
    trace_dir: str | None = Field(None, description=
            "Local folder where each model actor appends one JSON line per generate call (start, end, rows); for "
            "benchmarks and profiling.")
    run_id: str = Field(
        default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8],
        description="Identifies this run in every output row (default: UTC time + random suffix).",
    )

    def config_key(self) -> str:
        """Identifies the settings that shape the text: a rerun with the same key skips committed rows."""
        import hashlib
        import json

        shaping = {"model": self.model, "revision": self.revision, "quantization": self.quantization,
                   "num_frames": self.num_frames, "max_pixels": self.max_pixels,
                   "generation": self.generation.key_fields()}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]

    def default_prompt(self, media_type: str | None) -> str:
        return self.prompt or DEFAULT_PROMPTS.get(media_type or "video", DEFAULT_PROMPTS["video"])


class RunConfig(CaptionConfig):
    """Everything one batch run needs: the stages' CaptionConfig plus the manifest, the output and the
    run's own settings (lease, commit, cluster)."""

    manifest: str = Field(description="Manifest file or prefix (JSONL, CSV or Parquet; any fsspec URI).")
    output: str = Field(description="Output prefix for the Parquet dataset (any fsspec URI).")
    allowed_uri_prefixes: list[str] = Field(
        default_factory=list,
        description="Where manifest URIs may point (s3://bucket/prefix/, /local/folder/, https://host/path/); "
                    "others become `uri_not_allowed` rows before any I/O. Default: the manifest's own bucket, "
                    "or for a local manifest its folder.",
        json_schema_extra={"cli": {"flag": "--allow-uri-prefix", "metavar": "PREFIX",
                                   "help": "Repeat for several; replaces the default."}})
    retry_errors: bool = Field(False, description=
            "Also redo (id, prompt) pairs committed as errors under the same settings; their new rows replace the old "
            "error rows.")
    retry_flagged: list[str] = Field(default_factory=list, description=
            "Quality flags (empty, truncated, repetition, length_outlier, echo, not_text) whose committed ok rows are "
            "redone once, with the fallback generation settings (retry_fallback); the new rows (attempt 2) replace "
            "the old ones as --retry-errors replaces error rows. Rows of attempt 2 are not retried again.",
            json_schema_extra={"cli": {"metavar": "FLAG,...", "help": "Comma-separated, or the flag repeated."}})
    retry_fallback: GenerationConfig | None = Field(None, description=
            "Generation settings of retried flagged rows; default: the run's own with repetition_penalty at least 1.2 and "
            "no_repeat_ngram_size 4 if unset, and twice max_new_tokens when truncated rows are retried.",
            json_schema_extra={"cli": {"prefix": "fallback-"}})
    output_file_rows: int = Field(100_000, ge=1, description=
            "Rows per output Parquet file (about: the last file of a run is smaller): a million rows are ten files, not "
            "thousands, whatever the decode parallelism.")
    output_row_group_rows: int = Field(10_000, ge=1, description=
            "Rows per Parquet row group in the output files: the unit in which readers (pandas, DuckDB, Spark) read and "
            "skip a file.")
    ray_address: str | None = Field(None, description=
            "Ray cluster to join (e.g. ray://head:10001 or head:6379). Default: RAY_ADDRESS (set by `ray job submit`), "
            "else a new local cluster; a cluster merely running on this machine is never joined.",
            json_schema_extra={"cli": {"flag": "--address"}})
    lease_ttl_s: float = Field(60.0, ge=2, description=
            "Lifetime of the output's lease (pipeline/output/lease.py), renewed every third of it while the run runs: a "
            "run whose driver died blocks other runs on its output for at most this long.")
    actor_start_timeout_s: float = Field(7200.0, description=
            "Longest the run waits for its actor pools' minimum actors (every model replica: nodes added by the "
            "autoscaler, weights copied and loaded; the first preprocess actor) before Ray Data's no-progress clock "
            "starts; past it the run fails saying the cluster cannot start them. Ray Data's wait_for_min_actors_s; -1: "
            "do not wait (Ray's default).")
    no_progress_timeout_s: float = Field(3600.0, description=
            "Once the actors are up, longest the run may go with no block moving through any stage before Ray Data "
            "fails it (a hang). Ray Data's execution_no_progress_timeout_s (Ray's default 1800); -1: never.")

    @field_validator("retry_flagged", mode="before")
    @classmethod
    def _known_flags(cls, v):
        flags = [f for item in ([v] if isinstance(v, str) else v) for f in str(item).split(",") if f]
        unknown = sorted(set(flags) - set(QUALITY_FLAGS))
        if unknown:
            raise ValueError(f"unknown quality flag(s) {', '.join(unknown)}; known: {', '.join(QUALITY_FLAGS)}")
        return flags

    def fallback_generation(self) -> GenerationConfig:
        """The generation settings of the retried flagged rows (attempt 2)."""
        if self.retry_fallback is not None:
            return self.retry_fallback
        gen = self.generation
        update = {"repetition_penalty": max(gen.repetition_penalty, 1.2), "no_repeat_ngram_size": gen.no_repeat_ngram_size or 4}
        if "truncated" in self.retry_flagged:
            update["max_new_tokens"] = gen.max_new_tokens * 2
        return gen.model_copy(update=update)

    @field_validator("actor_start_timeout_s", "no_progress_timeout_s")
    @classmethod
    def _positive_or_never(cls, v: float) -> float:
        if v != -1 and v <= 0:
            raise ValueError(f"{v}: want seconds > 0, or -1 for no limit")
        return v

    @field_validator("manifest", "output")
    @classmethod
    def _local_paths_absolute(cls, v: str) -> str:
        # Workers run in other folders than the driver: a relative local path means the driver's.
        import os

        return os.path.abspath(v) if "://" not in v else v
