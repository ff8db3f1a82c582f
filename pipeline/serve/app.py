"""The deployments' Serve options and `build_app` (the settings: pipeline.serve.config).

Backpressure: each ingress replica takes `max_ongoing_requests` at once; Serve's proxy queues at
most `max_queued_requests` more and answers 429 beyond that (Serve's BackpressureConfig).
"""

from __future__ import annotations

from typing import Any

from pipeline.serve.config import ServeConfig, parse_args


def deployment_options(cfg: ServeConfig) -> tuple[dict, dict]:
    """(model options, ingress options) for Serve, from the config."""
    from ray.serve.config import BackpressureConfig

    gpus = cfg.num_gpus if cfg.num_gpus is not None else (cfg.tp if cfg.device == "cuda" else 0)
    cpus = cfg.model_num_cpus if cfg.device == "cuda" else max(cfg.model_num_cpus, cfg.tp)  # a rank process each
    model = {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        # room for one batch running and the next one filling
        "max_ongoing_requests": 2 * cfg.batch_size,
    }
    if cfg.max_replicas and cfg.max_replicas > cfg.replicas:
        model["autoscaling_config"] = {
            "min_replicas": cfg.replicas, "max_replicas": cfg.max_replicas, "initial_replicas": cfg.replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests or cfg.batch_size,
        }
    else:
        model["num_replicas"] = cfg.replicas
    ingress = {
        "num_replicas": cfg.frontend_replicas,
        "ray_actor_options": {"num_cpus": cfg.frontend_num_cpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
    }
    return model, ingress


def build_app(args: dict[str, Any]):
    """The application for `serve run pipeline.serve:build_app model=DIR ...` and `serve deploy`."""
    from pipeline.serve.ingress import ChatIngress
    from pipeline.serve.model import LlavaModel

    cfg = parse_args(args)
    model_opts, ingress_opts = deployment_options(cfg)
    model = LlavaModel.options(**model_opts).bind(cfg)
    return ChatIngress.options(**ingress_opts).bind(cfg, model)
