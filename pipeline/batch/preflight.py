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


def check_output_writable(cfg: RunConfig) -> None:
    """Write and delete a probe file under the output prefix (the run writes `_staging/` there)."""
    probe = join(cfg.output, f"_dry_run-{cfg.run_id}")
    try:
        fs, out = filesystem(cfg.output, cfg.storage)
        if protocol_of(cfg.output) == "file":
            fs.makedirs(out, exist_ok=True)
        with fs.open(filesystem(probe, cfg.storage)[1], "wb") as f:
            f.write(b"probe")
        fs.rm(filesystem(probe, cfg.storage)[1])
    except Exception as e:
        raise PreflightError(f"cannot write to output {cfg.output}: {type(e).__name__}: {e}") from e


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
    from pipeline.output.commit import OutputError, output_overlaps_manifest
    from pipeline.planning.manifest import ManifestError, list_manifest_files
    from pipeline.planning.plan import plan_run

    problem = output_overlaps_manifest(cfg)
    if problem:
        raise PreflightError(problem)
    try:
        files = list_manifest_files(cfg.manifest, cfg)
    except ManifestError as e:
        raise PreflightError(str(e)) from e
    check_output_writable(cfg)
    model = check_model(cfg)
    sizing = check_sizing(cfg)
    connect_ray(cfg.ray_address)  # the checks that need no cluster came first
    from pipeline.quality.figures import committed_quality

    try:
        plan = plan_run(cfg, files)
        quality = committed_quality(cfg) if plan.committed else None
    except (ManifestError, OutputError) as e:
        raise PreflightError(str(e)) from e
    return PreflightReport(items=plan.items, invalid_rows=plan.invalid, manifest_files=files, model=model,
                           sizing=sizing, plan=plan.line(), quality=quality.line() if quality else "")


def check_sizing(cfg: RunConfig) -> list[str]:
    """The sizing plan (GPU memory from --gpu-memory-gb; the cluster is not asked): a --tp that
    cannot split the model fails the dry run."""
    from pipeline.planning.sizing import SizingError, check_run

    try:
        return check_run(cfg, cfg.gpu_memory_gb, device="cpu" if cfg.device == "cpu" else "cuda")
    except SizingError as e:
        raise PreflightError(str(e)) from e
