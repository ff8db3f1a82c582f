"""ChatIngress: the HTTP side (CPU, FastAPI). Auth, body and prompt limits, URL rules, media fetch +
decode (in isolated child processes) and the HF processor in a thread pool, then the answer from
the model deployment as one JSON body or as Server-Sent Events (`stream: true`).

Every error, FastAPI's own 404/405 included, is answered in OpenAI's error shape. Log lines go to
Serve's logger, so they land in the replica's log.
"""

# No `from __future__ import annotations`: FastAPI must see real types (Request) in the ingress methods.
import asyncio
import base64
import hmac
import json
import logging
import queue
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from pipeline import metrics
from pipeline.serve.protocol import APIError, Chat, chat_of, chunk, completion, completion_id, generation_for, parse_request

log = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's log file

api = FastAPI(title="pipeline: LLaVA captioning and visual QA", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {e.detail}" + ("; see GET /v1/models" if e.status_code == 404 else "")
    return JSONResponse(APIError(e.status_code, message, code).body(), status_code=e.status_code)


@api.middleware("http")
async def _count(request: Request, call_next):
    response = await call_next(request)
    known = request.url.path in ("/v1/chat/completions", "/v1/models", "/health", "/openapi.json")
    route = request.url.path if known else ("/v1/models/{id}" if request.url.path.startswith("/v1/models/") else "other")
    metrics.serve_request(route, response.status_code, response.media_type == "text/event-stream")
    return response


# A 1x1 PNG: what each decoder child decodes once at start (warm-up).
PNG_1X1 = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def fetch_request(cfg, url: str, label: str, media_type: str) -> dict:
    """The arguments of pipeline.media.fetch.fetch_and_decode (run in the decoder child) for a
    client's media URL, already allowed by the URL rules: data: URLs decoded in memory, fetched
    files held to max_media_bytes, and `label` in messages (a data: URL is never echoed)."""
    return dict(uri=url, label=label, data_urls=True, max_bytes=cfg.max_media_bytes, storage=cfg.storage,
                declared_type=media_type, num_frames=cfg.num_frames, max_pixels=cfg.max_pixels)


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


@serve.deployment(name="ChatIngress")
@serve.ingress(api)
class ChatIngress:
    def __init__(self, cfg, model):
        from pipeline.model.checkpoint import local_checkpoint
        from pipeline.model.preprocess import Preprocessor
        from pipeline.serve.config import load_token

        self.cfg, self.model = cfg, model
        self.token = load_token(cfg)  # kept out of every log line and error message
        if self.token is None and not cfg.allow_unauthenticated:
            raise RuntimeError("no API token: set api_token_file (a mounted secret) or PIPELINE_API_TOKEN in the "
                               "replicas' environment; allow_unauthenticated: true serves without one")
        if self.token is None:
            log.warning("allow_unauthenticated is set and no token is configured: ANY client that reaches this "
                        "endpoint is served")
        self.preprocessor = Preprocessor(local_checkpoint(cfg.model, cfg.storage, weights=False), revision=cfg.revision,
                                         trust_remote_code=cfg.trust_remote_code)
        self.pool = ThreadPoolExecutor(cfg.prepare_threads, thread_name_prefix="prepare")
        self.decoders = self.start_decoders(cfg.prepare_threads)
        self.created = int(time.time())
        log.info("serving %s (auth %s)", cfg.model_name(), "on" if self.token else "OFF")

    def authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise APIError(401, "missing or wrong bearer token (Authorization: Bearer ...)", "invalid_api_key",
                           "authentication_error")

    async def read_body(self, request: Request, deadline: float) -> bytes:
        """The whole body within body_timeout_s (and the request's deadline), else 408."""
        timeout = min(self.cfg.body_timeout_s, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(self._receive_body(request), timeout=max(timeout, 0))
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout:.0f} s; send it faster or "
                                "in a smaller request", "request_timeout") from None

    async def _receive_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", "request_too_large")
        body = bytearray()
        async for part in request.stream():  # chunked uploads carry no length: count as they come
            body += part
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

    @api.get("/openapi.json")
    async def openapi(self, request: Request):
        self.authorize(request)
        return api.openapi()

    def model_card(self) -> dict:
        return {"id": self.cfg.model_name(), "object": "model", "created": self.created, "owned_by": "pipeline"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self.authorize(request)
        return {"object": "list", "data": [self.model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request):
        self.authorize(request)
        if model_id != self.cfg.model_name():
            raise APIError(404, f"model {model_id!r} is not served here; GET /v1/models", "model_not_found",
                           param="model")
        return self.model_card()

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        from pipeline.model.engine import row_seed
        from pipeline.serve.model import Job

        started = time.monotonic()
        deadline = started + self.cfg.request_timeout_s
        self.authorize(request)
        req = parse_request(await self.read_body(request, deadline))
        if req.model != self.cfg.model_name():
            raise APIError(404, f"model {req.model!r} is not served here; GET /v1/models", "model_not_found",
                           param="model")
        chat = chat_of(req, self.cfg.max_images_per_request)
        gen = generation_for(req, self.cfg.generation)
        loop = asyncio.get_running_loop()
        try:
            inputs = await asyncio.wait_for(loop.run_in_executor(self.pool, self.prepare, chat, deadline, gen.max_new_tokens),
                                            timeout=deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise APIError(504, f"no answer within {self.cfg.request_timeout_s} s (fetching and decoding the media)",
                           "timeout", "server_error")
        # a seed given: reproducible; none: a fresh one (sampling differs per request, as OpenAI's)
        seed = row_seed(req.seed, chat.last_prompt) if req.seed is not None else secrets.randbits(63)
        response = self.model.options(stream=True).generate.remote(Job(inputs, gen, seed, req.stops(), bool(req.stream)))
        events = self.events(response, deadline)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self.stream(events, started, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, last = [], {}
        async for event in events:
            if not text:
                metrics.serve_first_token(time.monotonic() - started, False)
            text.append(event["text"])
            last = event
        self.log_answer(chat, last, started)
        body = completion(completion_id(), self.cfg.model_name(), "".join(text), last["finish_reason"], last["usage"])
        # How many requests shared this one's generate call (the proof that batching happens).
        return JSONResponse(body, headers={"X-Pipeline-Batch-Size": str(last["batch_size"])})

    async def events(self, response, deadline: float):
        """The model's events for one request until its last; errors and the deadline raise APIError."""
        stream = response.__aiter__()
        try:
            while True:
                try:
                    events = await asyncio.wait_for(stream.__anext__(), timeout=max(deadline - time.monotonic(), 0))
                except StopAsyncIteration:
                    raise APIError(500, "the model ended the answer early", "model_error", "server_error")
                except asyncio.TimeoutError:
                    raise APIError(504, f"no answer within {self.cfg.request_timeout_s} s", "timeout", "server_error")
                for event in events:
                    if "error" in event:
                        raise APIError(500, event["error"], event.get("error_type", "model_error"), "server_error")
                    yield event
                    if "finish_reason" in event:
                        return
        finally:
            response.cancel()  # no-op once done; a timed-out or abandoned request leaves the model's queue

    async def stream(self, events, started: float, include_usage: bool):
        """Server-Sent Events: chat.completion.chunk bodies, then `data: [DONE]`."""
        id_, model = completion_id(), self.cfg.model_name()
        yield sse(chunk(id_, model, {"role": "assistant", "content": ""}))
        first = True
        try:
            async for event in events:
                if first:
                    metrics.serve_first_token(time.monotonic() - started, True)
                    first = False
                finish = event.get("finish_reason")
                if event["text"] or finish:
                    yield sse(chunk(id_, model, {"content": event["text"]} if event["text"] else {}, finish))
                if finish:
                    if include_usage:
                        yield sse(chunk(id_, model, None, usage_=event["usage"]))
                    metrics.serve_tokens(event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
                    log.info("chat %s (stream): %d+%d tokens, batch of %d, %.3f s", model,
                             event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"],
                             event["batch_size"], time.monotonic() - started)
        except APIError as e:  # the status line is sent: the error goes as an event (the openai client raises it)
            yield sse(e.body())
        yield sse("[DONE]")

    def log_answer(self, chat: Chat, last: dict, started: float) -> None:
        u = last["usage"]
        metrics.serve_tokens(u["prompt_tokens"], u["completion_tokens"])
        log.info("chat %s: %d %s, %d+%d tokens, batch of %d, %.3f s", self.cfg.model_name(), len(chat.urls),
                 chat.media_type, u["prompt_tokens"], u["completion_tokens"], last["batch_size"],
                 time.monotonic() - started)

    def start_decoders(self, n: int) -> queue.SimpleQueue:
        """One decoder child per prepare thread, started now: a request's time limit must not pay
        for a child's start (Python + PyAV imports, seconds on a busy node)."""
        from pipeline.media.decoder_process import DecoderProcess

        decoders = [DecoderProcess(self.cfg.decode_timeout_s, max_memory_bytes=int(self.cfg.decoder_memory_gb * 2**30))
                    for _ in range(n)]
        list(self.pool.map(self.warm_up, decoders))
        available = queue.SimpleQueue()
        for d in decoders:
            available.put(d)
        return available

    def warm_up(self, decoder) -> None:
        """(Re)start the decoder's child with a 1x1 PNG (after a kill, the next request must not wait for it)."""
        decoder.timeout_s = 120
        decoder.decode(**fetch_request(self.cfg, "data:image/png;base64," + base64.b64encode(PNG_1X1).decode(),
                                       "warm-up", "image"))

    def prepare(self, chat: Chat, deadline: float, max_new_tokens: int) -> dict:
        """URL rules, fetch + decode (in the decoder child), chat template + processor (in a worker thread)."""
        import numpy as np

        from pipeline.io.urls import URLRejected, check_uri
        from pipeline.media.decoded import MediaError
        from pipeline.model.families import UnsupportedMedia
        from pipeline.model.preprocess import PromptTooLong

        frames = []
        for n, url in enumerate(chat.urls):
            label = f"{chat.media_type}_url #{n + 1}" if url.startswith("data:") else url  # never echo a data: URL
            try:
                check_uri(url, self.cfg.allowed_schemes, self.cfg.allowed_prefixes)
            except URLRejected as e:
                raise APIError(400, f"{label} is not allowed: {e}", "url_not_allowed") from None
            decoder = self.decoders.get()  # as many as prepare threads: never waits
            # the child is killed past the request's own time: the work stops with the request
            decoder.timeout_s = max(min(self.cfg.decode_timeout_s, deadline - time.monotonic()), 0.01)
            try:
                decoded = decoder.decode(**fetch_request(self.cfg, url, label, chat.media_type))
            except MediaError as e:
                if e.error_type in ("timeout", "decoder_crashed"):  # the child was killed or died
                    self.warm_up(decoder)
                status = {"timeout": 504, "media_too_large": 413, "decoder_crashed": 400}.get(e.error_type, 400)
                raise APIError(status, str(e), e.error_type, "server_error" if status == 504 else "invalid_request_error") from None
            finally:
                self.decoders.put(decoder)
            frames.extend(decoded.frames if chat.media_type == "image" else [decoded.frames])
        media = frames if chat.media_type == "image" else np.asarray(frames[0])
        try:
            inputs = self.preprocessor.build(chat.media_type, media, chat.last_prompt, chat.messages)
        except UnsupportedMedia as e:
            raise APIError(400, str(e), e.error_type) from None
        except Exception as e:
            raise APIError(400, f"the processor rejected this input: {type(e).__name__}: {e}", "preprocess_error") from None
        if len(inputs["input_ids"]) > self.cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(inputs['input_ids'])} tokens (media included), over this "
                                f"server's limit of {self.cfg.max_prompt_tokens}; send less text or fewer images",
                           "prompt_too_long", param="messages")
        try:
            self.preprocessor.check_fits(len(inputs["input_ids"]), max_new_tokens)
        except PromptTooLong as e:
            raise APIError(400, str(e), e.error_type, param="messages") from None
        return inputs
