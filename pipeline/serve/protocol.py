"""The OpenAI chat-completions protocol as this server speaks it: the request shapes and what each
field means here, errors in OpenAI's shape, the response and stream-chunk bodies.

Every field the server does not implement is refused (400 `unsupported_parameter`, naming it) unless
it is null or holds OpenAI's neutral default; nothing is silently dropped.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import GenerationConfig

MAX_STOP_STRINGS = 4  # as OpenAI's API
# Fields a client may send with a value that changes nothing here (SDKs and UIs send some by default).
NEUTRAL_VALUES = {"logprobs": False, "presence_penalty": 0, "frequency_penalty": 0, "parallel_tool_calls": True}
IGNORED_FIELDS = {"user"}  # informational only in OpenAI's API too


class APIError(Exception):
    """Answered as OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.type, self.param = status, code, type_, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MediaURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted: this model has one resolution policy


class ContentPart(_Strict):
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: MediaURL | None = None
    video_url: MediaURL | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name in parse_request

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # vLLM's extension, with transformers' meaning (CTRL's penalty); no_repeat_ngram_size is a server setting
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None

    def stops(self) -> list[str]:
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]


def parse_request(body: bytes) -> ChatRequest:
    try:
        req = ChatRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise APIError(400, f"invalid request: {problems}", "invalid_request",
                       param=".".join(map(str, first["loc"]))) from None
    for name, value in (req.model_extra or {}).items():
        if value is not None and name not in IGNORED_FIELDS and NEUTRAL_VALUES.get(name, object()) != value:
            raise APIError(400, f"{name} is not supported by this server; leave it out", "unsupported_parameter",
                           param=name)
    if req.n not in (None, 1):
        raise APIError(400, "n must be 1 (one answer per request)", "unsupported_parameter", param="n")
    if len(req.stops()) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings", "invalid_request", param="stop")
    return req


@dataclass
class Chat:
    """A request's conversation in the chat template's form: media parts are {"type": "image"} (one
    per image) or {"type": "video"}, where the client put them; `urls` are their URLs in order."""

    messages: list[dict]
    media_type: str  # image | video
    urls: list[str] = field(default_factory=list)

    @property
    def last_prompt(self) -> str:
        return next((p["text"] for p in reversed(self.messages[-1]["content"]) if p["type"] == "text"), "")


def chat_of(req: ChatRequest, max_images: int) -> Chat:
    """System messages, history and several images; one video at most, not mixed with images."""
    messages, urls, kinds = [], [], []
    for i, m in enumerate(req.messages):
        parts = m.content if isinstance(m.content, list) else [ContentPart(type="text", text=m.content or "")]
        content = []
        for j, p in enumerate(parts):
            if p.type == "text":
                content.append({"type": "text", "text": p.text or ""})
                continue
            if m.role != "user":
                raise APIError(400, f"messages[{i}]: only user messages may hold media ({p.type})",
                               "unsupported_content", param=f"messages[{i}].content[{j}]")
            ref = p.image_url if p.type == "image_url" else p.video_url
            if ref is None:
                raise APIError(400, f"messages[{i}].content[{j}]: the {p.type} part has no {p.type} object",
                               "invalid_content", param=f"messages[{i}].content[{j}]")
            kinds.append("image" if p.type == "image_url" else "video")
            urls.append(ref.url)
            content.append({"type": kinds[-1]})
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system role
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's (the turn to answer)", "unsupported_messages",
                       param="messages")
    if not kinds:
        raise APIError(400, "the conversation needs an image_url or video_url part: this model answers about media",
                       "unsupported_content", param="messages")
    if "video" in kinds and len(kinds) > 1:
        raise APIError(400, "send one video_url, or image_url parts, per request (not several videos, nor "
                            "videos with images)", "unsupported_content", param="messages")
    if len(kinds) > max_images:
        raise APIError(400, f"at most {max_images} images per request on this server ({len(kinds)} sent)",
                       "too_many_images", param="messages")
    if not any(p["type"] == "text" and p["text"].strip() for p in messages[-1]["content"]):
        raise APIError(400, "the last user message needs a text part (the instruction or question)",
                       "invalid_content", param="messages")
    return Chat(messages, kinds[0], urls)


def generation_for(req: ChatRequest, default: GenerationConfig) -> GenerationConfig:
    """The server's generation settings with the request's; max_tokens above the cap is clamped
    (the answer then ends with finish_reason "length"), as vLLM does."""
    asked = req.max_completion_tokens or req.max_tokens or default.max_new_tokens
    return default.model_copy(update={k: v for k, v in {
        "max_new_tokens": min(asked, default.max_new_tokens), "temperature": req.temperature, "top_p": req.top_p,
        "repetition_penalty": req.repetition_penalty,
    }.items() if v is not None})


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id_: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_}


def chunk(id_: str, model: str, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    """One chat.completion.chunk; delta None: the usage-only last chunk (choices empty)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
