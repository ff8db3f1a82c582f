"""The pipeline's stages as Ray Data UDFs (plain Python: tests call them without Ray).

Each stage takes and returns pyarrow tables with an explicit schema, passes error rows through
untouched and turns its own failures into error rows (status, error_type, error) instead of raising.
"""

from __future__ import annotations

import io
import json
import os
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pipeline import metrics, schemas
from pipeline.config import CaptionConfig

_MEDIA_FIELDS = [
    ("media_type", pa.string()),
    ("num_frames", pa.int64()),
    ("frame_timestamps_s", pa.list_(pa.float64())),
    ("duration_s", pa.float64()),
    ("fps", pa.float64()),
    ("codec", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
]
_ROW_FIELDS = [
    ("id", pa.string()), ("uri", pa.string()), ("uris", pa.list_(pa.string())), ("source", pa.string()),
    ("status", pa.string()), ("error_type", pa.string()), ("error", pa.string()),
]
# decode -> preprocess: one row per item, decoded frames packed as .npz bytes ("frames" for one
# media file: (T, H, W, 3); "image_0", "image_1", ... for the images of a `uris` row).
# `retry_prompts`: those of its prompts that redo flagged rows (--retry-flagged: attempt 2, fallback settings)
ITEM_SCHEMA = pa.schema(_ROW_FIELDS + _MEDIA_FIELDS + [("prompts", pa.list_(pa.string())), ("retry_prompts", pa.list_(pa.string())),
                                                       ("frames", pa.large_binary())])
# preprocess -> generate: one row per (item, prompt), model inputs packed as .npz bytes.
REQUEST_SCHEMA = pa.schema(_ROW_FIELDS + _MEDIA_FIELDS + [
    ("prompt", pa.string()), ("attempt", pa.int64()), ("prompt_tokens", pa.int64()), ("model_inputs", pa.large_binary())])
# generate -> format_output (`token_ids`: the generated tokens, for the quality flags; not written)
RESULT_SCHEMA = pa.schema(_ROW_FIELDS + _MEDIA_FIELDS + [
    ("prompt", pa.string()), ("attempt", pa.int64()), ("prompt_tokens", pa.int64()), ("text", pa.string()),
    ("output_tokens", pa.int64()), ("finish_reason", pa.string()), ("token_ids", pa.list_(pa.int32()))])


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays -> bytes without pickle (npz, uncompressed: the payload is pixels, compression wastes CPU)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _error(row: dict, error_type: str, message: str) -> dict:
    row.update(status="error", error_type=error_type, error=message)
    return row


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


_decoders = {}  # one decoder child process per worker process and settings


def _decoder(cfg: CaptionConfig):
    from pipeline.media.decoder_process import DecoderProcess

    key = (cfg.decode_timeout_s, cfg.decoder_memory_gb)
    if key not in _decoders:
        _decoders[key] = DecoderProcess(cfg.decode_timeout_s, max_memory_bytes=int(cfg.decoder_memory_gb * 2**30))
    return _decoders[key]


def video_resize(cfg: CaptionConfig) -> dict | None:
    """The checkpoint's video resize (resize_in_decoder), read once on the driver and handed to the
    decode stage as data: decode workers never touch the checkpoint."""
    if not cfg.resize_in_decoder:
        return None
    from pipeline.model.checkpoint import local_checkpoint
    from pipeline.model.preprocess import video_resize_spec

    try:
        return video_resize_spec(local_checkpoint(cfg.model, cfg.storage, weights=False))
    except Exception:  # noqa: BLE001 - the model stage reports an unreadable checkpoint; decode goes on
        return None


def decode_media(records: pa.Table, cfg: CaptionConfig, resize: dict | None = None, *, prefixes: list[str]) -> pa.Table:
    """Fetch + decode each item, in a child process that may crash or hang without harm (CPU).
    Facts the driver computed once, handed over as data: `prefixes`, where media may be (the
    decoder checks each opened file against them again); `resize`, the video resize of
    `video_resize(cfg)`, done in the decoder process (None: none)."""
    from pipeline.media.decoded import MediaError

    items, started = [], metrics.clock()
    for rec in records.to_pylist():
        item = {k: rec[k] for k in ("id", "uri", "uris", "source", "status", "error_type", "error", "media_type")}
        if rec["status"] == "ok":
            try:
                if rec["uris"]:
                    _decode_images(item, rec["uris"], cfg, prefixes)
                else:
                    d = _decoder(cfg).decode(uri=rec["uri"], storage=cfg.storage, declared_type=rec["media_type"],
                                             num_frames=cfg.num_frames, start_s=rec["start_s"], end_s=rec["end_s"],
                                             max_pixels=cfg.max_pixels, video_resize=resize,
                                             allowed_prefixes=prefixes)
                    item.update(_media_fields(d), num_frames=len(d.frames), frames=pack({"frames": d.frames}))
            except MediaError as e:
                _error(item, e.error_type, str(e))
        # the record's prompts still to do (the plan left out those committed); none given: the run's
        # default, for the media type found (a file's bytes can say image where the manifest said nothing)
        item["prompts"] = rec["prompts"] if rec["prompts"] is not None else [cfg.default_prompt(_prompt_kind(item))]
        item["retry_prompts"] = rec.get("retry_prompts")  # of those, the ones redoing flagged rows (attempt 2)
        items.append(item)
    metrics.decoded(items, started)
    return _table(items, ITEM_SCHEMA)


def _media_fields(d) -> dict:
    return dict(media_type=d.media_type, frame_timestamps_s=d.timestamps_s or None, duration_s=d.duration_s,
                fps=d.fps, codec=d.codec, width=d.width, height=d.height)


def _prompt_kind(item: dict) -> str | None:
    """What the default prompt describes: several images, else the item's media type."""
    return "images" if len(item["uris"] or []) > 1 else item["media_type"]


def _decode_images(item: dict, uris: list[str], cfg: CaptionConfig, prefixes: list[str]) -> None:
    """The images of a `uris` row, each decoded alone; the row's media fields are the first image's."""
    images = [_decoder(cfg).decode(uri=uri, storage=cfg.storage, declared_type="image", num_frames=1,
                                   max_pixels=cfg.max_pixels, allowed_prefixes=prefixes) for uri in uris]
    item.update(_media_fields(images[0]), num_frames=len(images),
                frames=pack({f"image_{i}": d.frames[0] for i, d in enumerate(images)}))


def unpack_frames(data: bytes) -> np.ndarray | list[np.ndarray]:
    """What decode_media packed: a (T, H, W, 3) array, or the list of a `uris` row's images."""
    arrays = unpack(data)
    if "frames" in arrays:
        return arrays["frames"]
    return [arrays[f"image_{i}"] for i in range(len(arrays))]


class Preprocess:
    """Chat template + HF processor (CPU actor: the processor is loaded once)."""

    def __init__(self, cfg: CaptionConfig):
        from pipeline.model.checkpoint import local_checkpoint
        from pipeline.model.preprocess import Preprocessor

        self.preprocessor = Preprocessor(local_checkpoint(cfg.model, cfg.storage, weights=False), revision=cfg.revision,
                                         trust_remote_code=cfg.trust_remote_code)
        self.max_new_tokens = cfg.generation.max_new_tokens

    def __call__(self, items: pa.Table) -> pa.Table:
        from pipeline.model.families import UnsupportedMedia
        from pipeline.model.preprocess import PromptTooLong

        requests = []
        for item in items.to_pylist():
            frames = unpack_frames(item.pop("frames")) if item["status"] == "ok" else None
            retries = set(item.pop("retry_prompts") or ())
            for prompt in item.pop("prompts"):
                row = dict(item, prompt=prompt, attempt=2 if prompt in retries else 1)
                if frames is not None:
                    try:
                        inputs = self.preprocessor.build(item["media_type"], frames, prompt)
                        row.update(prompt_tokens=len(inputs["input_ids"]))
                        self.preprocessor.check_fits(len(inputs["input_ids"]), self.max_new_tokens)
                        row.update(model_inputs=pack(inputs))
                    except (UnsupportedMedia, PromptTooLong) as e:
                        _error(row, e.error_type, str(e))
                    except Exception as e:
                        _error(row, "preprocess_error", f"the processor rejected this input: {type(e).__name__}: {e}")
                requests.append(row)
        return _table(requests, REQUEST_SCHEMA)


class Generate:
    """The model (GPU actor when the cluster has GPUs, else CPU): one model replica per actor,
    across `tp` GPUs (or CPU processes) of its node when tp > 1 (pipeline/model/tensor_parallel.py).

    Continuous scheduling (the default): each Ray Data batch holds QUEUED_BATCHES x batch_size rows,
    batch_size of them in the model at a time; as a row ends the next one joins at the next step
    (pipeline/model/continuous.py), so rows of varied answer lengths keep the slots full."""

    QUEUED_BATCHES = 4

    @classmethod
    def rows_per_call(cls, cfg: CaptionConfig) -> int:
        return cfg.batch_size * (cls.QUEUED_BATCHES if cfg.scheduling == "continuous" else 1)

    def __init__(self, cfg: CaptionConfig, device: str):
        from pipeline.model.checkpoint import local_checkpoint
        from pipeline.model.tensor_parallel import make_engine

        self.cfg = cfg
        if device == "cpu" and cfg.model_cpu_threads:
            import torch

            torch.set_num_threads(cfg.model_cpu_threads)
        self.engine = make_engine(cfg, local_checkpoint(cfg.model, cfg.storage), device)

    def __call__(self, requests: pa.Table) -> pa.Table:
        from pipeline.model.batching import RowError, generate_rows
        from pipeline.model.engine import row_seed

        rows = requests.to_pylist()
        for attempt in (1, 2):  # the run's settings; the fallback of retried flagged rows (--retry-flagged)
            todo = [r for r in rows if r["status"] == "ok" and (r["attempt"] or 1) == attempt]
            if not todo:
                continue
            gen = generation_of(self.cfg, attempt)
            inputs = [unpack(r["model_inputs"]) for r in todo]
            seeds = [row_seed(gen.seed, r["id"], r["prompt"]) for r in todo]
            started, wall_started = metrics.generating(todo), time.time()
            # out of memory: split and retried; other failures: isolated to the failing row(s)
            for row, result in zip(todo, generate_rows(self.engine, inputs, gen, seeds)):
                if isinstance(result, RowError):
                    _error(row, result.error_type, result.message)
                else:
                    row.update(text=result.text, output_tokens=result.output_tokens, finish_reason=result.finish_reason,
                               token_ids=result.token_ids)
            metrics.generated(todo, started)
            if self.cfg.trace_dir:
                self._trace(wall_started, len(todo))
        return _table(rows, RESULT_SCHEMA)

    def _trace(self, started: float, rows: int) -> None:
        """One JSON line per generate call: when and where (Ray node) the model was busy (benchmarks read these)."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        path = os.path.join(self.cfg.trace_dir, f"generate-{os.getpid()}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"start": started, "end": time.time(), "rows": rows, "node_id": node}) + "\n")


def generation_of(cfg: CaptionConfig, attempt: int):
    """The generation settings of an attempt: 1 the run's, 2 the fallback of --retry-flagged (a batch
    run's: RunConfig.fallback_generation; a pipeline.caption dataset has attempt 1 only)."""
    return cfg.fallback_generation() if attempt == 2 else cfg.generation


def format_output(results: pa.Table, cfg: CaptionConfig) -> pa.Table:
    """Rows in the output schema of schemas/output.schema.json, with the quality flags of each
    generated text (pipeline/quality/flags.py; CPU, from the text, its tokens and finish reason)."""
    from pipeline.quality import quality_flags

    n = results.num_rows
    metrics.rows_written(results.column("status").to_pylist(), results.column("error_type").to_pylist())
    rows = results.select(["status", "text", "prompt", "token_ids", "finish_reason", "attempt"]).to_pylist()
    flags = [quality_flags(r["text"], prompt=r["prompt"], task=cfg.task, token_ids=r["token_ids"], finish_reason=r["finish_reason"],
                           cfg=cfg.quality) if r["status"] == "ok" else None for r in rows]
    settings = {a: generation_of(cfg, a).model_dump_json() for a in {r["attempt"] or 1 for r in rows if r["status"] == "ok"}}
    metrics.quality(flags, [r["finish_reason"] for r in rows])
    run = {
        "quality_flags": pa.array(flags, pa.list_(pa.string())),
        "attempt": pa.array([(r["attempt"] or 1) if r["status"] == "ok" else None for r in rows], pa.int64()),
        "generation": pa.array([settings[r["attempt"] or 1] if r["status"] == "ok" else None for r in rows], pa.string()),
        "task": pa.array([cfg.task] * n, pa.string()),
        "model": pa.array([cfg.model] * n, pa.string()),
        "config_key": pa.array([cfg.config_key()] * n, pa.string()),
        "run_id": pa.array([cfg.run_id] * n, pa.string()),
        "created_at": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
    }
    schema = schemas.output_arrow_schema()
    columns = [run[name] if name in run else results.column(name) for name in schema.names]
    return pa.Table.from_arrays(columns, schema=schema)
