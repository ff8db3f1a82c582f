"""The run against the cluster it finds: Ray Data's timeouts set for slow starts, and the actor
pools checked (and fitted) against the cluster's CPUs so that a small cluster fails at once with
the reason instead of hanging.

Why: the decode + preprocess pool (its first actor) and the model replicas are actors that hold
their CPUs for the whole run; Ray Data's task stages (filter, repartition, format + write) need a
CPU beside them. On a fixed cluster without that CPU the run waits forever with no message (a
`ray start --head --num-cpus 2` cluster with a CPU model). An autoscaling cluster may grow into
the need, so there it is only logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RunConfig

log = logging.getLogger("pipeline")

TASK_CPUS = 1  # Ray Data's task stages run with 1 CPU each (its default for map tasks): one must fit


def configure_data_context(cfg: RunConfig):
    """Ray Data settings the run relies on, on the driver's current DataContext (read when the
    datasets execute). The actor pools wait up to actor_start_timeout_s for their first actors
    (Ray Data starts its operators, then its no-progress guard: a slow model load or a cold
    autoscaler counts against the wait, not the guard); once running, no block may stall for
    no_progress_timeout_s."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = int(cfg.actor_start_timeout_s) if cfg.actor_start_timeout_s > 0 else -1
    ctx.execution_no_progress_timeout_s = cfg.no_progress_timeout_s
    return ctx


@dataclass
class Fit:
    cpus: float           # the cluster's CPUs now
    needed: float         # what the pools hold at their smallest plus one task stage
    autoscaling: bool     # the cluster may add nodes
    preprocess_workers: int

    def problem(self, cfg: RunConfig, use_gpu: bool) -> str | None:
        if self.cpus >= self.needed or self.autoscaling:
            return None
        model = (f"{cfg.replicas} model replica(s) x 1 CPU beside their GPUs" if use_gpu
                 else f"{cfg.replicas} model replica(s) x {cfg.tp} CPU(s) (--device cpu, --tp {cfg.tp})")
        return (f"the Ray cluster has {self.cpus:g} CPUs and cannot add nodes, but this run needs at least "
                f"{self.needed:g}: {model}, 1 for the first decode + preprocess actor and {TASK_CPUS} for Ray Data's "
                f"task stages (filter, repartition, write). Start Ray with more CPUs (ray start --num-cpus "
                f"{int(self.needed)}), add a node, or run fewer --replicas.")


def model_cpus(cfg: RunConfig, use_gpu: bool) -> float:
    """CPUs the model actors hold: tp each on CPU; on GPU, Ray Data's default 1 CPU per actor."""
    return cfg.replicas * (1 if use_gpu else cfg.tp)


KUBERAY_ENV = ("KUBERAY_GEN_RAY_START_CMD", "RAY_USAGE_STATS_KUBERAY_IN_USE")  # set by KubeRay in its Ray pods
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # the launcher's autoscaling config on its head (`ray up`)


def autoscaling_enabled() -> bool:
    """Whether an autoscaler may add nodes to the cluster. Any of: Ray Data's own check (the cluster
    config the autoscaler reported to the GCS, when it does), a KubeRay pod (its env), a launcher
    head (its autoscaling config, which Ray Tune's cluster check reads too). The driver runs on the
    head under `ray job submit`. A cluster of `ray start` nodes has none of them."""
    import os

    if any(os.environ.get(name) for name in KUBERAY_ENV) or Path(LAUNCHER_CONFIG).expanduser().exists():
        return True
    try:
        from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled

        return is_autoscaling_enabled()
    except Exception as e:  # a private Ray API: if it moves, assume the cluster may grow (log, never refuse wrongly)
        log.warning("cannot tell whether the Ray cluster autoscales (%s); not checking its size", e)
        return True


def fit_to_cluster(cfg: RunConfig, use_gpu: bool, cpus: float | None = None, autoscaling: bool | None = None) -> Fit:
    """The pools against the cluster's CPUs: on a fixed cluster the decode + preprocess pool grows
    at most into the CPUs the model and one task stage leave free."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0) if cpus is None else cpus
    autoscaling = autoscaling_enabled() if autoscaling is None else autoscaling
    fixed = model_cpus(cfg, use_gpu) + TASK_CPUS
    workers = cfg.preprocess_workers
    if not autoscaling:
        workers = max(1, min(workers, int(cpus - fixed)))
        if workers < cfg.preprocess_workers:
            log.info("--preprocess-workers %d -> %d: the cluster has %g CPUs and cannot add nodes", cfg.preprocess_workers,
                     workers, cpus)
    elif cpus < fixed + 1:
        log.info("the Ray cluster has %g CPUs now and this run needs at least %g: waiting for the autoscaler to add "
                 "nodes (up to --actor-start-timeout-s %g s)", cpus, fixed + 1, cfg.actor_start_timeout_s)
    return Fit(cpus=cpus, needed=fixed + 1, autoscaling=autoscaling, preprocess_workers=workers)
