"""The public API, top to bottom: a Ray Data Dataset of manifest-like rows -> a lazy Dataset of output rows.

    ds = pipeline.caption(ds, pipeline.CaptionConfig(model=..., allowed_uri_prefixes=[...]))

    rows --validate (records_from_rows)--> records --decode--> items --Preprocess--> requests
         --Generate (model actors)--> results --format_output--> output rows (schemas/output.schema.json)

Every row comes out, failures as error rows; nothing is written or committed: the caller composes
the result with their own operators (a filter, a join, their own write). The batch job
(pipeline/batch/run.py) is caption_records plus the manifest's plan, the lease and the commit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.batch.stages import Generate, Preprocess, decode_media, format_output, video_resize
from pipeline.config import CaptionConfig
from pipeline.planning.manifest import records_from_rows

UNSIZED_ROWS_PER_BLOCK = 16  # a lazy input has no row count: decode work spreads in blocks of this many rows


@dataclass(frozen=True)
class DriverFacts:
    """What the driver works out once and hands to the stages as data (never recomputed per row)."""

    prefixes: list[str]  # where media may be: the decode stage checks each opened file against them
    device: str  # where the model stage runs: "cuda" or "cpu"
    video_resize: dict | None  # the checkpoint's video resize, done in the decoder process (stages.video_resize)


def caption(ds, config: CaptionConfig):
    """Captions (task caption) or answers (task qa) for the rows of a Ray Data Dataset, as a lazy Dataset
    of output rows: one per (item, prompt), error rows included, in the output schema. The input rows
    have the manifest's columns (id, uri or uris, media_type, prompt, questions, start_s, end_s; others
    are ignored) and are checked by the manifest's rules inside Ray Data; ids are not checked for
    repeats. Nothing is committed anywhere. On the driver, at this call: Ray is joined or started as
    Ray Data does (to see whether the cluster has GPUs), and the checkpoint's processor config is read
    (its video resize)."""
    config = CaptionConfig.model_validate(config)  # a RunConfig passes as itself; a dict is validated
    if not config.allowed_uri_prefixes:  # (a RunConfig's default, the manifest's store, has no manifest here)
        raise ValueError("allowed_uri_prefixes is empty: name where the media may be (s3://bucket/, /data/media/, ...)")
    facts = driver_facts(config, list(config.allowed_uri_prefixes))
    records = ds.map_batches(records_from_rows, fn_kwargs={"prefixes": facts.prefixes, "cfg": config}, batch_format="pyarrow")
    return caption_records(records, config, facts)


def driver_facts(cfg: CaptionConfig, prefixes: list[str]) -> DriverFacts:
    return DriverFacts(prefixes=prefixes, device=model_device(cfg), video_resize=video_resize(cfg))


def caption_records(records, cfg: CaptionConfig, facts: DriverFacts, rows: int | None = None):
    """The stages over validated records (RECORD_SCHEMA; a Dataset or a pyarrow table of `rows`
    records): decode -> preprocess -> generate -> output rows. Nothing runs until the result is consumed."""
    import ray
    from ray.data import ActorPoolStrategy

    ds = records if isinstance(records, ray.data.Dataset) else ray.data.from_arrow(records)
    # Small blocks: a decode task handles one block, so block size bounds decode parallelism.
    ds = ds.repartition(target_num_rows_per_block=rows_per_block(rows))
    # Ray Data fuses decode into the preprocess actors (same CPUs, no full-resolution frames through
    # the object store); the pool grows to preprocess_workers while the model stage keeps up.
    ds = ds.map_batches(decode_media, fn_kwargs={"cfg": cfg, "prefixes": facts.prefixes, "resize": facts.video_resize},
                        batch_format="pyarrow", batch_size=1, num_cpus=1)
    ds = ds.map_batches(Preprocess, fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=1,
                        compute=ActorPoolStrategy(min_size=1, max_size=cfg.preprocess_workers), num_cpus=1)
    # One actor per model replica, holding all its devices: Ray places it on one node, and with
    # tp > 1 it starts one rank process per device there (pipeline/model/tensor_parallel.py).
    ds = ds.map_batches(Generate, fn_constructor_kwargs={"cfg": cfg, "device": facts.device}, batch_format="pyarrow",
                        batch_size=Generate.rows_per_call(cfg), compute=ActorPoolStrategy(size=cfg.replicas),
                        **model_resources(cfg, facts.device == "cuda"))
    return ds.map_batches(format_output, fn_kwargs={"cfg": cfg}, batch_format="pyarrow")


def rows_per_block(rows: int | None) -> int:
    """Rows per decode block: at least 64 blocks up to 64 rows each for a known count, else UNSIZED_ROWS_PER_BLOCK."""
    return UNSIZED_ROWS_PER_BLOCK if rows is None else max(1, min(64, math.ceil(rows / 64)))


def model_resources(cfg: CaptionConfig, use_gpu: bool) -> dict:
    """What one model replica asks of Ray: tp GPUs (or CPUs), on nodes of the accelerator type, with the custom resources."""
    resources = {"num_gpus": cfg.tp} if use_gpu else {"num_cpus": cfg.tp}
    if cfg.accelerator_type:  # only nodes of that type: 7B actors stay off (and do not scale up) 8-GPU nodes
        resources["accelerator_type"] = cfg.accelerator_type
    if cfg.model_resources:
        resources["resources"] = dict(cfg.model_resources)
    return resources


class DeviceError(ValueError):
    """The model cannot run on this cluster as configured; the message says what to change."""


def model_device(cfg: CaptionConfig) -> str:
    """Where the model stage runs, from the cluster's GPUs: cuda when asked or (auto) when there are any."""
    import ray

    if not ray.is_initialized():
        ray.init()  # as Ray Data itself does: RAY_ADDRESS, else a cluster on this machine, else a new local one
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "cuda" and not gpus:
        raise DeviceError("--device cuda was given but the Ray cluster has no GPUs; add GPU nodes or use --device auto")
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if cfg.quantization and not use_gpu:
        raise DeviceError(f"--quantization {cfg.quantization} needs GPUs (bitsandbytes) but the Ray cluster has none; "
                          "add GPU nodes or drop --quantization")
    return "cuda" if use_gpu else "cpu"
