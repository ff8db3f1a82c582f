"""Online captioning and visual QA: an OpenAI-compatible chat endpoint on Ray Serve.

    serve run pipeline.serve:build_app model=DIR [key=value ...]     (keys: ServeConfig's fields)
    serve deploy cluster/serve.yaml

One module per concern:
- config: ServeConfig (the settings), `key=value` arguments, the API token.
- app: the deployments' Serve options, build_app.
- protocol: the OpenAI chat request and response shapes, what each field means here, errors.
- ingress: ChatIngress (CPU, FastAPI): auth, limits, media + preprocessing, JSON or SSE answers.
- model: LlavaModel (GPU when configured): one Engine; concurrent requests share generate calls,
  each streaming its own tokens.
Media URLs are fetched and decoded by the batch job's own code (pipeline.media.fetch.fetch_and_decode)
in its isolated decoder child (pipeline.media.decoder_process), with the server's options.

Names are imported on first use (PEP 562): importing a submodule (config) does not import Ray Serve
or FastAPI.
"""

_EXPORTS = {"build_app": "app", "ServeConfig": "config", "parse_args": "config", "load_token": "config",
            "deployment_options": "app"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
