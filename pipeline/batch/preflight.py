"""`--dry-run`: check a run's config, manifest and output before any cluster time is spent.

No model is loaded and no media is read: a scheduled job that would fail on a typo in a URI or a
missing permission fails here, in seconds, with the reason. The manifest is planned as the run
would plan it (pipeline/planning/plan.py, on Ray: the local cluster this starts, or --address), so the
report also says how many items the output already holds under these settings and how many a
run would do now, in a `plan: key=value ...` line for scripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import RunConfig
from pipeline.io.storage import filesystem, join, protocol_of
from pipeline.output.location import OutputLocation, output_overlaps_manifest


class PreflightError(Exception):
    """A check failed; the message says which and why."""


@dataclass
class PreflightReport:
    items: int = 0
    invalid_rows: int = 0
    manifest_files: list[str] = field(default_factory=list)
    model: str = ""
    sizing: list[str] = field(default_factory=list)
    plan: str = ""
    quality: str = ""  # the quality figures of the rows already committed under these settings

    def line(self) -> str:
        return "\n".join([f"dry run OK: manifest {len(self.manifest_files)} file(s), {self.items} items "
                          f"({self.invalid_rows} invalid rows would become error rows); output writable; "
                          f"model: {self.model}", *self.sizing, self.plan, *([f"committed {self.quality}"] if self.quality else [])])


def check_output_writable(out: OutputLocation, run_id: str) -> None:
    """Write and delete a probe file under the output prefix (the run writes `_staging/` there)."""
    probe = out.child(f"_dry_run-{run_id}")
    try:
        if out.is_local:
            out.fs.makedirs(out.path, exist_ok=True)
        with out.fs.open(probe, "wb") as f:
            f.write(b"probe")
        out.fs.rm(probe)
    except Exception as e:
        raise PreflightError(f"cannot write to output {out.uri}: {type(e).__name__}: {e}") from e


def check_model(cfg: RunConfig) -> str:
    """A local folder or object-store prefix must hold config.json; a hub id is resolved at run time."""
    fs, path = filesystem(cfg.model, cfg.storage)
    is_local_path = protocol_of(cfg.model) == "file" and (cfg.model.startswith(("/", ".", "file://")) or fs.exists(path))
    if protocol_of(cfg.model) != "file" or is_local_path:
        try:
            found = fs.exists(join(path, "config.json"))
        except Exception as e:
            raise PreflightError(f"cannot read model {cfg.model}: {type(e).__name__}: {e}") from e
        if not found:
            raise PreflightError(f"model {cfg.model} holds no config.json: is it a transformers checkpoint?")
        return f"{cfg.model} (config.json found)"
    return f"{cfg.model} (hub id: not checked, resolved when the model loads)"


def preflight(cfg: RunConfig) -> PreflightReport:
    from pipeline.batch.run import connect_ray
    from pipeline.output.committed import OutputError
    from pipeline.planning.manifest import ManifestError, manifest_file_sizes
    from pipeline.planning.plan import plan_run

    out = OutputLocation.of(cfg.output, cfg.storage)
    problem = output_overlaps_manifest(out, cfg.manifest)
    if problem:
        raise PreflightError(problem)
    try:
        files = manifest_file_sizes(cfg.manifest, cfg)  # the one listing of the manifest, with the bytes the plan weighs
    except ManifestError as e:
        raise PreflightError(str(e)) from e
    check_output_writable(out, cfg.run_id)
    model = check_model(cfg)
    sizing = check_sizing(cfg)
    connect_ray(cfg.ray_address)  # the checks that need no cluster came first
    from pipeline.output.committed import committed_quality

    try:
        plan = plan_run(cfg, out, files)
        quality = committed_quality(cfg, out) if plan.committed else None
    except (ManifestError, OutputError) as e:
        raise PreflightError(str(e)) from e
    return PreflightReport(items=plan.items, invalid_rows=plan.invalid, manifest_files=plan.files, model=model,
                           sizing=sizing, plan=plan.line(), quality=quality.line() if quality else "")


def check_sizing(cfg: RunConfig) -> list[str]:
    """The sizing plan (GPU memory from --gpu-memory-gb; the cluster is not asked): a --tp that
    cannot split the model fails the dry run."""
    from pipeline.planning.sizing import SizingError, check_run

    try:
        return check_run(cfg, cfg.gpu_memory_gb, device="cpu" if cfg.device == "cpu" else "cuda")
    except SizingError as e:
        raise PreflightError(str(e)) from e
