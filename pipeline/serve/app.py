"""Online captioning and visual QA: an OpenAI-compatible chat endpoint on Ray Serve.

    serve run pipeline.serve:build_app model=DIR [key=value ...]     (keys: ServeConfig's fields)
    serve deploy cluster/serve.yaml

Two deployments:
- ChatIngress (CPU, FastAPI): auth, body limit, request parsing, URL rules, then fetch + decode +
  preprocess in a thread pool (the same media and processor code as the batch job), so no media
  work ever runs in the model's process or blocks an event loop.
- LlavaModel (GPU when configured): one Engine; `@serve.batch` collects concurrent requests into
  one generate call (batch size and wait from the config), run in a worker thread so the replica
  keeps accepting the next batch meanwhile.
Backpressure: each ingress replica takes `max_ongoing_requests` at once; Serve's proxy queues at
most `max_queued_requests` more and answers 429 beyond that (Serve's BackpressureConfig).
"""

# No `from __future__ import annotations`: FastAPI must see real types (Request) in the ingress methods.
import asyncio
import hmac
import io
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve

from pipeline.config import GenerationConfig, ModelSettings

log = logging.getLogger("pipeline.serve")

TOKEN_ENV = "PIPELINE_API_TOKEN"


class ServeConfig(ModelSettings):
    """The server's settings: the batch job's model settings plus serving, protection and scaling.
    `batch_size` is the most requests per generate call; `replicas` the model replicas (the
    autoscaling minimum when max_replicas is larger)."""

    model_config = ConfigDict(extra="forbid")

    served_model_name: str | None = Field(None, description="Model id in /v1/models and responses; default: the model path's last part.")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="Longest wait for a batch to fill before generating.")
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
    max_media_bytes: int = Field(200 * 2**20, ge=1024, description="Largest media file fetched from a URL; larger gets 413.")
    allowed_schemes: list[str] = Field(["data", "s3", "gs", "https"], description="URL schemes clients may name (file: and chained URLs never).")
    allowed_prefixes: list[str] = Field([], description="Prefixes non-data URLs must start with, e.g. s3://bucket/media/ or https:// (none: data: only).")
    api_token_file: str | None = Field(None, description=f"File holding the bearer token (a mounted secret); default: ${TOKEN_ENV}; neither: no auth.")

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


# ---------------------------------------------------------------------------------------------
# OpenAI chat request format (the subset this model answers)

class MediaURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: MediaURL | None = None
    video_url: MediaURL | None = None


class Message(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int = 1
    stream: bool = False


class APIError(Exception):
    """Answered as OpenAI's error body: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.type = status, code, type_


@dataclass
class Turn:
    media_type: str  # image | video
    url: str
    prompt: str


def user_turn(req: ChatRequest) -> Turn:
    """One user message with one image_url or video_url part and its text: what the model answers."""
    if len(req.messages) != 1 or req.messages[0].role != "user":
        raise APIError(400, "send exactly one message, from the user (no system prompt or history)", "unsupported_messages")
    content = req.messages[0].content
    parts = content if isinstance(content, list) else [ContentPart(type="text", text=content or "")]
    media = [p for p in parts if p.type != "text"]
    if len(media) != 1:
        raise APIError(400, "the message needs exactly one image_url or video_url part", "unsupported_content")
    part = media[0]
    ref = part.image_url if part.type == "image_url" else part.video_url
    if ref is None:
        raise APIError(400, f"the {part.type} part has no {part.type} object", "invalid_content")
    prompt = "\n".join(p.text for p in parts if p.type == "text" and p.text).strip()
    if not prompt:
        raise APIError(400, "the message needs a text part (the instruction or question)", "invalid_content")
    return Turn("image" if part.type == "image_url" else "video", ref.url, prompt)


def generation_for(req: ChatRequest, default: GenerationConfig) -> GenerationConfig:
    if req.stream:
        raise APIError(400, "stream=true is not supported: answers come whole (the engine generates a batch at once)", "stream_unsupported")
    if req.n != 1:
        raise APIError(400, "n must be 1", "unsupported_n")
    max_new = req.max_completion_tokens or req.max_tokens or default.max_new_tokens
    if max_new > default.max_new_tokens:
        raise APIError(400, f"max_tokens must be at most {default.max_new_tokens} on this server", "max_tokens_too_large")
    return default.model_copy(update={k: v for k, v in {
        "max_new_tokens": max_new, "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
    }.items() if v is not None})


def open_media(url: str, cfg: ServeConfig):
    """A seekable file object for an allowed URL (data: decoded in memory, objects by ranged reads)."""
    import base64
    import binascii

    from pipeline.storage import open_binary, protocol_of

    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(400, "data: URLs must be base64 (data:TYPE;base64,...)", "invalid_data_url")
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"the data: URL is not valid base64 ({e})", "invalid_data_url") from e
    if protocol_of(url) in ("http", "https"):
        import fsspec

        # Redirects are not followed: a public URL must not bounce us to an internal address.
        with fsspec.open(url, "rb", allow_redirects=False) as f:
            data = f.read(cfg.max_media_bytes + 1)
        if len(data) > cfg.max_media_bytes:
            raise APIError(413, f"the media is larger than {cfg.max_media_bytes} bytes", "media_too_large")
        return io.BytesIO(data)
    f = open_binary(url, cfg.storage)
    if (getattr(f, "size", None) or 0) > cfg.max_media_bytes:
        f.close()
        raise APIError(413, f"the media is larger than {cfg.max_media_bytes} bytes", "media_too_large")
    return f


# ---------------------------------------------------------------------------------------------
# The model deployment

@dataclass
class Job:
    inputs: dict[str, np.ndarray]
    generation: GenerationConfig
    seed: int


@serve.deployment(name="LlavaModel")
class LlavaModel:
    def __init__(self, cfg: ServeConfig):
        from pipeline.checkpoint import local_checkpoint
        from pipeline.tensor_parallel import make_engine

        self.engine = make_engine(cfg, local_checkpoint(cfg.model, cfg.storage), cfg.device)
        self.generate_batch.set_max_batch_size(cfg.batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    async def ping(self) -> str:
        return "ok"

    async def generate(self, inputs: dict[str, np.ndarray], generation: GenerationConfig, seed: int) -> dict:
        return await self.generate_batch(Job(inputs, generation, seed))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)  # replaced from the config in __init__
    async def generate_batch(self, jobs: list[Job]) -> list[dict]:
        # In a thread: the event loop keeps taking requests, which form the next batch.
        return await asyncio.to_thread(self._generate, jobs)

    def _generate(self, jobs: list[Job]) -> list[dict]:
        from pipeline.isolate import RowError, generate_rows

        out: list[dict] = [{}] * len(jobs)
        groups: dict[str, list[int]] = {}  # one generate call per distinct generation setting
        for i, job in enumerate(jobs):
            groups.setdefault(job.generation.model_dump_json(), []).append(i)
        for idx in groups.values():
            gen = jobs[idx[0]].generation
            # out of memory: split and retried; other failures: isolated to the failing request(s)
            results = generate_rows(self.engine, [jobs[i].inputs for i in idx], gen, [jobs[i].seed for i in idx])
            for i, r in zip(idx, results):
                out[i] = ({"error": r.message} if isinstance(r, RowError) else
                          {"text": r.text, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.output_tokens,
                           "batch_size": len(jobs), "max_new_tokens": gen.max_new_tokens})
        return out


# ---------------------------------------------------------------------------------------------
# The HTTP ingress

api = FastAPI(title="pipeline: LLaVA captioning and visual QA", docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return JSONResponse({"error": {"message": str(e), "type": e.type, "code": e.code, "param": None}},
                        status_code=e.status)


@serve.deployment(name="ChatIngress")
@serve.ingress(api)
class ChatIngress:
    def __init__(self, cfg: ServeConfig, model):
        from pipeline.checkpoint import local_checkpoint
        from pipeline.preprocess import Preprocessor

        self.cfg, self.model = cfg, model
        self.token = load_token(cfg)  # kept out of every log line and error message
        self.preprocessor = Preprocessor(local_checkpoint(cfg.model, cfg.storage), revision=cfg.revision,
                                         trust_remote_code=cfg.trust_remote_code)
        self.pool = ThreadPoolExecutor(cfg.prepare_threads, thread_name_prefix="prepare")
        self.created = int(time.time())
        log.info("serving %s (auth %s)", cfg.model_name(), "on" if self.token else "off")

    def authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise APIError(401, "missing or wrong bearer token (Authorization: Bearer ...)", "invalid_api_key",
                           "authentication_error")

    async def read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", "request_too_large")
        body = bytearray()
        async for chunk in request.stream():  # chunked uploads carry no length: count as they come
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes", "request_too_large")
        return bytes(body)

    @api.get("/health")
    async def health(self):
        try:
            await asyncio.wait_for(self.model.ping.remote(), timeout=10)
        except Exception as e:
            raise APIError(503, f"the model is not answering ({type(e).__name__})", "unavailable", "server_error")
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self.authorize(request)
        return {"object": "list", "data": [
            {"id": self.cfg.model_name(), "object": "model", "created": self.created, "owned_by": "pipeline"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        started = time.monotonic()
        self.authorize(request)
        try:
            req = ChatRequest.model_validate_json(await self.read_body(request))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
            raise APIError(400, f"invalid request: {problems}", "invalid_request")
        if req.model != self.cfg.model_name():
            raise APIError(404, f"model {req.model!r} is not served here; GET /v1/models", "model_not_found")
        turn = user_turn(req)
        gen = generation_for(req, self.cfg.generation)
        try:
            result = await asyncio.wait_for(self.answer(turn, gen), timeout=self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, f"no answer within {self.cfg.request_timeout_s} s", "timeout", "server_error")
        if "error" in result:
            raise APIError(500, result["error"], "model_error", "server_error")
        usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                 "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
        log.info("chat %s: %s, %d+%d tokens, batch of %d, %.3f s", self.cfg.model_name(), turn.media_type,
                 usage["prompt_tokens"], usage["completion_tokens"], result["batch_size"], time.monotonic() - started)
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.cfg.model_name(),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         # the engine's count includes the end token, so a full budget means it was cut
                         "finish_reason": "length" if result["completion_tokens"] >= result["max_new_tokens"] else "stop"}],
            "usage": usage,
        }
        # How many requests shared this one's generate call (the proof that batching happens).
        return JSONResponse(body, headers={"X-Pipeline-Batch-Size": str(result["batch_size"])})

    async def answer(self, turn: Turn, gen: GenerationConfig) -> dict:
        from pipeline.engine import row_seed

        inputs = await asyncio.get_running_loop().run_in_executor(self.pool, self.prepare, turn)
        response = self.model.generate.remote(inputs, gen, row_seed(gen.seed, turn.prompt))
        try:
            return await response
        except asyncio.CancelledError:  # timed out: drop it from the model's queue too
            response.cancel()
            raise

    def prepare(self, turn: Turn) -> dict[str, np.ndarray]:
        """URL rules, fetch, decode, chat template + processor (in a worker thread)."""
        from pipeline.media import MediaError, decode_file
        from pipeline.urls import URLRejected, check_uri

        label = f"the {turn.media_type}_url" if turn.url.startswith("data:") else turn.url  # never echo a data: URL
        try:
            check_uri(turn.url, self.cfg.allowed_schemes, self.cfg.allowed_prefixes)
        except URLRejected as e:
            raise APIError(400, f"{label} is not allowed: {e}", "url_not_allowed") from None
        try:
            with open_media(turn.url, self.cfg) as f:
                decoded = decode_file(f, label, turn.media_type, self.cfg.num_frames, max_pixels=self.cfg.max_pixels)
        except MediaError as e:
            raise APIError(400, str(e), e.error_type) from None
        except (FileNotFoundError, PermissionError, OSError) as e:
            raise APIError(400, f"{label} could not be read ({type(e).__name__})", "not_found") from None
        from pipeline.families import UnsupportedMedia

        try:
            return self.preprocessor.build(decoded.media_type, decoded.frames, turn.prompt)
        except UnsupportedMedia as e:
            raise APIError(400, str(e), e.error_type) from None
        except Exception as e:
            raise APIError(400, f"the processor rejected this input: {type(e).__name__}: {e}", "preprocess_error") from None


# ---------------------------------------------------------------------------------------------

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
    cfg = parse_args(args)
    model_opts, ingress_opts = deployment_options(cfg)
    model = LlavaModel.options(**model_opts).bind(cfg)
    return ChatIngress.options(**ingress_opts).bind(cfg, model)
