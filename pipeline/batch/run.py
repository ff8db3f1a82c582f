"""The whole flow, top to bottom: manifest -> decode -> preprocess -> generate -> Parquet."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from pipeline.batch.caption import DeviceError, DriverFacts, caption_records, model_device
from pipeline.batch.fit import configure_data_context, fit_to_cluster
from pipeline.batch.stages import video_resize
from pipeline.config import RunConfig
from pipeline.io.urls import media_prefixes
from pipeline.output import commit, lease
from pipeline.output.committed import OutputError, read_files, staged_sources
from pipeline.output.location import OutputLocation, output_overlaps_manifest
from pipeline.planning.manifest import manifest_file_sizes
from pipeline.planning.plan import Plan, plan_run
from pipeline.quality.figures import QualityCounts
from pipeline.quality.run_checks import run_checks

log = logging.getLogger("pipeline")


class RunError(Exception):
    """The run cannot start or complete; the message says why and what to do."""


@dataclass
class RunSummary:
    run_id: str
    items: int
    rows: int
    ok: int
    errors: int
    error_types: dict
    wall_s: float
    output: str
    skipped: int = 0
    discarded: int = 0  # rows staged by earlier runs that died before their commit (computed again)
    quality: QualityCounts | None = None  # rows per quality flag and finish reason
    checks: dict | None = None  # the run's cross-row checks (pipeline/quality/run_checks.py)

    @property
    def items_per_s(self) -> float:
        return self.items / self.wall_s if self.wall_s else 0.0

    def line(self) -> str:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.error_types.items()))
        skipped = f", {self.skipped} already committed" if self.skipped else ""
        quality = f"{self.quality.line()}; " if self.quality and self.rows else ""
        found = {k: v["found"] for k, v in (self.checks or {}).items() if v["found"]}
        checks = "".join(f"{k}={v}; " for k, v in found.items())
        return (f"run {self.run_id}: {self.items} items -> {self.rows} rows ({self.ok} ok, {self.errors} error"
                f"{f': {kinds}' if kinds else ''}){skipped} in {self.wall_s:.1f} s, {self.items_per_s:.2f} items/s; "
                f"{quality}{checks}output: {self.output}")


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join only the cluster the user named (--address, RAY_ADDRESS, which `ray job submit` sets for
    its driver), else start a private local one. Never `address="auto"`: it joins whatever Ray
    cluster runs on the machine, somebody else's included."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    # Light CPU stages run beside the model actor; on small machines give them logical room.
    log.info("no --address or RAY_ADDRESS given: starting a local Ray cluster for this run")
    ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1))


def build_dataset(cfg: RunConfig, records, rows: int, use_gpu: bool, resize: dict | None = None):
    """The Ray Data plan over `records` (a dataset of `rows` records): the public API's stages
    (pipeline/batch/caption.py) with the facts the run found on its driver. Nothing runs until the
    dataset is written. `resize`: the video resize the decoders apply (stages.video_resize, read
    once on the driver)."""
    facts = DriverFacts(prefixes=media_prefixes(cfg.allowed_uri_prefixes, cfg.manifest), device="cuda" if use_gpu else "cpu",
                        video_resize=resize)
    return caption_records(records, cfg, facts, rows)


def run(cfg: RunConfig) -> RunSummary:
    """One run, holding the output's lease (pipeline/output/lease.py) from before its recovery to the end
    of its commit: a second run on the same output stops at once, before it changes anything."""
    out = OutputLocation.of(cfg.output, cfg.storage)  # resolved once: every step below writes through it
    problem = output_overlaps_manifest(out, cfg.manifest)
    if problem:
        raise RunError(problem)
    try:
        with lease.held(out, cfg.run_id, cfg.lease_ttl_s) as held:
            return _run(cfg, out, held)
    except (lease.LeaseError, commit.CommitError, OutputError) as e:
        raise RunError(str(e)) from e


def _run(cfg: RunConfig, out: OutputLocation, held: lease.Lease) -> RunSummary:
    started = time.time()
    connect_ray(cfg.ray_address)
    try:
        use_gpu = model_device(cfg) == "cuda"
    except DeviceError as e:
        raise RunError(str(e)) from e
    fit = fit_to_cluster(cfg, use_gpu)  # a cluster too small for the pools stops here, not in a silent hang
    if fit.problem(cfg, use_gpu):
        raise RunError(fit.problem(cfg, use_gpu))
    cfg = cfg.model_copy(update={"preprocess_workers": fit.preprocess_workers})
    configure_data_context(cfg)  # slow model loads and cold autoscaling wait for the actors, not Ray Data's stall guard
    files = manifest_file_sizes(cfg.manifest, cfg)  # the run's one listing of the manifest
    discarded = commit.recover(out)
    plan = plan_run(cfg, out, files)
    log.info("manifest: %d items from %d file(s); %d already committed in %s; %d to do", plan.items, len(files),
             plan.committed, cfg.output, plan.todo)
    if plan.todo:
        for line in sizing_lines(cfg, use_gpu):
            log.info("%s", line)
        commit.write(build_dataset(cfg, plan.pending(), plan.todo, use_gpu, video_resize(cfg)), out, cfg)
    written = commit.staged(out, cfg.run_id)
    # Every pending manifest row must have produced output (by its file:line) before the commit:
    # an incomplete run fails loudly, commits nothing, and a rerun redoes only what is missing.
    if plan.todo:
        missing, examples = plan.missing(staged_sources(out, written.files) if written.files else None)
        if missing:
            raise RunError(f"{missing} manifest rows have no output row (for example {examples}); "
                           f"the run is incomplete and nothing was committed. Rerun the same command.")
    # the cross-row quality checks, on Ray Data over the staged ok rows
    checks = run_checks(cfg, lambda fn: read_files(out, written.files, fn), written.by_status["ok"])
    wall = time.time() - started
    summary = RunSummary(run_id=cfg.run_id, items=plan.todo, rows=written.rows, ok=written.by_status["ok"],
                         errors=written.by_status["error"], error_types=dict(written.by_error_type),
                         wall_s=wall, output=cfg.output, skipped=plan.committed, discarded=discarded,
                         quality=written.quality, checks=checks)
    replaced = plan.superseded() if (cfg.retry_errors or cfg.retry_flagged) and plan.todo else {}
    held.check()  # a run that lost its lease (it stalled past the TTL and another took over) commits nothing
    commit.commit(out, cfg, written, ledger(cfg, summary, plan), replaced)
    return summary


def sizing_lines(cfg: RunConfig, use_gpu: bool) -> list[str]:
    """The sizing plan for this cluster (pipeline/planning/sizing.py); RunError for a tp the model cannot use."""
    import ray

    from pipeline.planning.sizing import SizingError, check_run

    gpus = per_node = memory_gb = None
    alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    # the nodes the model stage may use: those of --accelerator-type when it is given
    nodes = [n for n in alive if not cfg.accelerator_type or f"accelerator_type:{cfg.accelerator_type}" in n]
    if not nodes:  # a typo waits forever: name what the cluster has (Ray's names are case-sensitive)
        present = sorted({k.split(":", 1)[1] for n in alive for k in n if k.startswith("accelerator_type:")})
        log.warning("no node has accelerator type %s now (this cluster's: %s); the model stage waits until the "
                    "autoscaler adds one", cfg.accelerator_type, ", ".join(present) or "none")
    if use_gpu:
        gpus = int(sum(n.get("GPU", 0) for n in nodes))
        per_node = max((int(n.get("GPU", 0)) for n in nodes), default=0)
        memory_gb = cfg.gpu_memory_gb or gpu_memory_gb(accelerator_type=cfg.accelerator_type)
    try:
        return check_run(cfg, memory_gb, gpus, per_node, "cuda" if use_gpu else "cpu")
    except SizingError as e:
        raise RunError(str(e)) from e


def gpu_memory_gb(timeout_s: float = 60, accelerator_type: str | None = None) -> float | None:
    """One GPU's memory, asked of a GPU node of that type (None if no GPU is free within timeout_s)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def total_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    ref = total_memory.options(**({"accelerator_type": accelerator_type} if accelerator_type else {})).remote()
    try:
        return ray.get(ref, timeout=timeout_s) / 1e9
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        log.info("sizing: no GPU free within %g s to measure its memory; pass --gpu-memory-gb", timeout_s)
        return None


def ledger(cfg: RunConfig, summary: RunSummary, plan: Plan) -> dict:
    """What the run did, with what, beside its output: `_runs/RUN_ID.json`."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("pipeline", "ray", "torch", "transformers", "av", "pillow", "pyarrow"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {"run_id": cfg.run_id, "manifest_files": plan.files, "manifest_items": plan.items,
            "items": summary.items, "skipped_already_committed": summary.skipped,
            "discarded_rows_of_failed_runs": summary.discarded, "quality_checks": summary.checks or {},
            "wall_s": round(summary.wall_s, 3), "items_per_s": round(summary.items_per_s, 3),
            "config": cfg.model_dump(mode="json"), "versions": versions}
