"""The online server on Ray Serve, called with the official openai client: same answers as the
batch job, batching under concurrency, and each protection (401, 413, 429, 504, URL rules).

Real components throughout: a local Ray cluster, Serve's proxy, the tiny checkpoint, moto's S3
server for object-store video URLs. Two applications share the cluster: "main" for the normal
path and "tight" (one request at a time, a one-slot queue, a 1 s timeout) for overload."""

import asyncio
import base64
import json
from collections import Counter
from pathlib import Path

import httpx2  # the openai client's own HTTP library
import numpy as np
import openai
import pytest
import yaml
from conftest import REPO, free_port
from PIL import Image
from pydantic import ValidationError

from pipeline.batch.stages import Generate, Preprocess, decode_media
from pipeline.config import GenerationConfig, RunConfig
from pipeline.io.urls import URLRejected, check_uri, is_public_address
from pipeline.planning.manifest import scan_manifest
from pipeline.serve import ServeConfig, build_app, load_token, parse_args
from tests.helpers.textmatch import difference, references

TOKEN = "test-token-0123456789"
MAX_NEW_TOKENS = 8
NUM_FRAMES = 4
# (sample file, how the server gets it, prompt): the inputs compared with the batch job.
CASES = [
    ("photo.jpg", "data", "What is in this photo?"),
    ("logo.png", "data", "Any text?"),
    ("palette.gif", "data", "Describe this image."),
    ("street.mp4", "s3", "What moves?"),
]


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, samples, s3_endpoint, tmp_path_factory):
    import boto3
    from ray import serve

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="media")
    s3.upload_file(str(samples / "street.mp4"), "media", "street.mp4")
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    common = {"model": str(tiny_model), "served_model_name": "tiny-llava", "num_frames": str(NUM_FRAMES),
              "max_new_tokens": str(MAX_NEW_TOKENS), "frontend_num_cpus": "0.5", "model_num_cpus": "0.5"}
    main = build_app({**common, "batch_size": "8", "batch_wait_timeout_s": "0.2", "max_body_bytes": str(2**20),
                      "allowed_prefixes": "s3://media/,https://", "storage.endpoint_url": s3_endpoint,
                      "api_token_file": str(token_file), "max_images_per_request": "3"})
    # One request at a time, one queue slot, and a batch wait longer than the timeout: overload on demand.
    # (static scheduling: continuous batching has no batch wait)
    tight = build_app({**common, "scheduling": "static", "batch_size": "16", "batch_wait_timeout_s": "3", "request_timeout_s": "1",
                       "max_ongoing_requests": "1", "max_queued_requests": "1", "allow_unauthenticated": "true"})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many([serve.RunTarget(main, name="main", route_prefix="/"),
                    serve.RunTarget(tight, name="tight", route_prefix="/tight")])
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def batch_texts(tiny_model, samples, tmp_path_factory):
    """The batch job's answers for CASES: decode -> preprocess -> generate as plain Python."""
    manifest = tmp_path_factory.mktemp("serve-parity") / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": name, "uri": str(samples / name), "prompt": prompt}) + "\n"
                                for name, _, prompt in CASES))
    cfg = RunConfig(manifest=str(manifest), output="/unused", model=str(tiny_model), num_frames=NUM_FRAMES,
                    allowed_uri_prefixes=[str(samples)], generation=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS))
    scan = scan_manifest(cfg)
    requests = Preprocess(cfg)(decode_media(scan.records, cfg, prefixes=scan.prefixes))
    generate = Generate(cfg, device="cpu")
    rows = generate(requests).to_pylist()
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    # token for token, up to ties the reference cannot tell apart (tests/helpers/textmatch.py)
    refs = references(generate.engine.model, generate.engine.tokenizer, requests.to_pylist(), MAX_NEW_TOKENS)
    tokenizer = generate.engine.tokenizer
    return {r["id"]: dict(r, matches=lambda text, key=(r["id"], r["prompt"]): difference(refs[key], tokenizer, text))
            for r in rows}


def messages(samples: Path, name: str, transport: str, prompt: str) -> list[dict]:
    if transport == "s3":
        part = {"type": "video_url", "video_url": {"url": f"s3://media/{name}"}}
    else:
        mime = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif"}[name.rsplit(".", 1)[1]]
        part = {"type": "image_url", "image_url": {"url": data_url(samples / name, mime)}}
    return [{"role": "user", "content": [part, {"type": "text", "text": prompt}]}]


def client(server, key=TOKEN, cls=openai.OpenAI):
    return cls(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=60)


def test_health_and_models(server):
    assert httpx2.get(f"{server}/health").json() == {"status": "ok"}  # probes need no token
    assert [m.id for m in client(server).models.list()] == ["tiny-llava"]


def test_image_data_url_and_video_s3_url_answer_like_the_batch_job(server, samples, batch_texts):
    api = client(server)
    for name, transport, prompt in CASES:
        reply = api.chat.completions.create(model="tiny-llava", messages=messages(samples, name, transport, prompt))
        expected = batch_texts[name]
        assert expected["matches"](expected["text"]) is None, name
        assert expected["matches"](reply.choices[0].message.content) is None, name
        assert reply.usage.prompt_tokens == expected["prompt_tokens"]
        if reply.choices[0].message.content == expected["text"]:
            assert reply.usage.completion_tokens == expected["output_tokens"]
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert len({r["text"] for r in batch_texts.values()}) > 1  # the comparison tells inputs apart


def test_64_concurrent_requests_are_batched_and_answer_like_the_batch_job(server, samples, batch_texts,
                                                                          record_property):
    api = client(server, cls=openai.AsyncOpenAI)

    async def one(i):
        name, transport, prompt = CASES[i % len(CASES)]
        raw = await api.chat.completions.with_raw_response.create(
            model="tiny-llava", messages=messages(samples, name, transport, prompt))
        return name, raw.parse().choices[0].message.content, int(raw.headers["x-pipeline-batch-size"])

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(all_of_them())
    assert len(results) == 64
    for name, text, _ in results:
        assert batch_texts[name]["matches"](text) is None, name
    sizes = Counter(size for _, _, size in results)
    record_property("batch_sizes", dict(sizes))
    print(f"requests per observed batch size: {dict(sorted(sizes.items()))}")
    assert max(sizes) > 1 and max(sizes) <= 8


def test_bearer_token_is_required(server, samples):
    assert httpx2.get(f"{server}/v1/models").status_code == 401
    assert httpx2.get(f"{server}/v1/models", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, key="wrong").chat.completions.create(
            model="tiny-llava", messages=messages(samples, *CASES[0]))
    assert e.value.code == "invalid_api_key" and TOKEN not in str(e.value)


def test_request_body_limit(server):
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    big = b'{"model": "tiny-llava", "messages": [], "pad": "' + b"x" * (2**20) + b'"}'
    r = httpx2.post(f"{server}/v1/chat/completions", content=big, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the server counts what arrives
        yield big[: 2**19]
        yield big[2**19:]

    r = httpx2.post(f"{server}/v1/chat/completions", content=chunks(), headers=headers)
    assert r.status_code == 413


@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "concat:/etc/passwd|/etc/hosts",
    "/etc/passwd",
    "https://127.0.0.1/a.png",
    "https://localhost/a.png",
    "https://169.254.169.254/latest/meta-data/",
    "https://[::1]/a.png",
    "https://[::ffff:10.0.0.1]/a.png",
    "https://10.1.2.3/a.png",
    "http://example.com/a.png",
    "s3://other-bucket/a.png",
    "s3://media-private/a.png",
    "simplecache::s3://media/street.mp4",
])
def test_urls_into_the_servers_network_are_refused(server, url):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}])
    assert e.value.code == "url_not_allowed"


# ---- the OpenAI protocol as clients use it ---------------------------------------------------------

def image_part(samples: Path, name: str) -> dict:
    mime = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif"}[name.rsplit(".", 1)[1]]
    return {"type": "image_url", "image_url": {"url": data_url(samples / name, mime)}}


def streamed(api, **request) -> tuple[str, list, object]:
    """(text, content chunks, the usage chunk or None) of a streamed completion."""
    chunks = list(api.chat.completions.create(model="tiny-llava", stream=True, **request))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    return "".join(c.choices[0].delta.content for c in content), chunks, chunks[-1].usage


def test_stream_sends_chunks_as_sse_and_equals_the_whole_answer(server, samples):
    api = client(server)
    request = {"messages": messages(samples, *CASES[0])}
    whole = api.chat.completions.create(model="tiny-llava", **request)
    text, chunks, usage = streamed(api, stream_options={"include_usage": True}, **request)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # token by token, not whole
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == []  # the usage chunk
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    # without include_usage no usage chunk; the wire format ends with [DONE]
    _, plain, last_usage = streamed(api, **request)
    assert last_usage is None and plain[-1].choices[0].finish_reason
    with httpx2.stream("POST", f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                       json={"model": "tiny-llava", "stream": True, **request}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_batched_streams_each_get_their_own_tokens_as_generated(server, samples):
    api = client(server, cls=openai.AsyncOpenAI)

    async def one(i):
        request = {"messages": messages(samples, *CASES[i % 3])}  # the three images: different answers
        arrivals, text = [], ""
        async for c in await api.chat.completions.create(model="tiny-llava", stream=True, **request):
            if c.choices and c.choices[0].delta.content:
                arrivals.append(asyncio.get_running_loop().time())
                text += c.choices[0].delta.content
        whole = await api.chat.completions.with_raw_response.create(model="tiny-llava", **request)
        return i, text, whole.parse().choices[0].message.content, arrivals

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(12)))

    results = asyncio.run(all_of_them())
    for i, text, whole, arrivals in results:
        assert text == whole, i
        assert len(arrivals) > 1 and arrivals[-1] > arrivals[0], i  # pieces came over time, not at once
    assert len({text for _, text, _, _ in results}) > 1


def test_several_images_system_message_and_history(server, samples, tiny_model):
    from pipeline.model.preprocess import Preprocessor

    api = client(server)
    pre = Preprocessor(str(tiny_model))
    images = [np.asarray(Image.open(samples / n).convert("RGB")) for n in ("photo.jpg", "logo.png")]
    two = api.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": [
        image_part(samples, "photo.jpg"), image_part(samples, "logo.png"), {"type": "text", "text": "Compare."}]}])
    # both images reached the model: the prompt is the batch job's for a `uris` row of the two
    assert two.usage.prompt_tokens == len(pre.build("image", images, "Compare.")["input_ids"])
    history = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [image_part(samples, "photo.jpg"), {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A photo."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image_part(samples, "logo.png")]},
    ]
    reply = api.chat.completions.create(model="tiny-llava", messages=history)
    # the prompt is the checkpoint's chat template over the whole conversation, media where they were put
    conversation = [{"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A photo."}]},
                    {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]}]
    text = pre.prompt_text("image", "", 2, conversation)
    assert "Answer in one word." in text and "A photo." in text
    assert reply.usage.prompt_tokens == len(pre.build("image", images, "", conversation)["input_ids"])
    with pytest.raises(openai.BadRequestError) as e:  # above max_images_per_request (3 in the fixture)
        api.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": [
            *[image_part(samples, "logo.png")] * 4, {"type": "text", "text": "Compare."}]}])
    assert e.value.code == "too_many_images"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny-llava", messages=[*history[:3]])  # nothing for the model to answer
    assert e.value.code == "unsupported_messages"


def test_llava_1_5_refuses_several_images_clearly(tiny_checkpoint, samples):
    """The family rule the ingress answers 400 with (UnsupportedMedia), for a LLaVA-1.5 checkpoint."""
    from pipeline.model.families import UnsupportedMedia
    from pipeline.model.preprocess import Preprocessor

    pre = Preprocessor(str(tiny_checkpoint("llava")))
    image = np.asarray(Image.open(samples / "photo.jpg").convert("RGB"))
    with pytest.raises(UnsupportedMedia, match="one image per prompt"):
        pre.build("image", [image, image], "Compare.", [{"role": "user", "content": [
            {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}])


def test_stop_strings_cut_the_answer_streamed_or_not(server, samples):
    api = client(server)
    request = {"messages": messages(samples, *CASES[0])}
    full = api.chat.completions.create(model="tiny-llava", **request).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full
    expected = full[: full.find(stop)]
    cut = api.chat.completions.create(model="tiny-llava", stop=[stop, "never-generated"], **request)
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < MAX_NEW_TOKENS
    text, chunks, _ = streamed(api, stop=stop, **request)
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny-llava", stop=["a", "b", "c", "d", "e"], **request)
    assert e.value.param == "stop"


@pytest.mark.parametrize("extra", [
    {"logprobs": True}, {"top_logprobs": 2}, {"response_format": {"type": "json_object"}},
    {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"presence_penalty": 0.5}, {"n": 2},
    {"extra_body": {"no_such_field": 1}},
])
def test_fields_the_server_does_not_implement_are_refused_by_name(server, samples, extra):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="tiny-llava", messages=messages(samples, *CASES[1]), **extra)
    name = next(iter(extra.get("extra_body", extra)))
    assert e.value.code == "unsupported_parameter" and e.value.param == name and name in e.value.message


def test_neutral_defaults_are_accepted(server, samples):
    reply = client(server).chat.completions.create(model="tiny-llava", messages=messages(samples, *CASES[1]),
                                                   logprobs=False, presence_penalty=0, n=1, user="someone")
    assert reply.choices[0].message.content


def test_models_retrieve_and_every_error_in_openai_shape(server):
    api = client(server)
    assert api.models.retrieve("tiny-llava").id == "tiny-llava"
    with pytest.raises(openai.NotFoundError) as e:
        api.models.retrieve("other-model")
    assert e.value.code == "model_not_found"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for method, path, status in [("GET", "/v1/nowhere", 404), ("DELETE", "/v1/models", 405),
                                 ("GET", "/v1/chat/completions", 405)]:
        r = httpx2.request(method, f"{server}{path}", headers=auth)
        error = r.json()["error"]
        assert r.status_code == status and set(error) == {"message", "type", "param", "code"}, r.text
        assert error["code"] == {404: "not_found", 405: "method_not_allowed"}[status]


def test_sampling_draws_a_fresh_seed_per_request_unless_one_is_given(server, samples):
    api = client(server)
    request = {"messages": messages(samples, *CASES[0]), "temperature": 1.0}
    unseeded = {api.chat.completions.create(model="tiny-llava", **request).choices[0].message.content
                for _ in range(4)}
    assert len(unseeded) > 1
    seeded = {api.chat.completions.create(model="tiny-llava", seed=7, **request).choices[0].message.content
              for _ in range(2)}
    assert len(seeded) == 1


def test_max_tokens_above_the_cap_is_clamped(server, samples):
    reply = client(server).chat.completions.create(model="tiny-llava", messages=messages(samples, *CASES[0]),
                                                   max_tokens=4096)
    assert reply.usage.completion_tokens <= MAX_NEW_TOKENS
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == MAX_NEW_TOKENS else "stop")
    small = client(server).chat.completions.create(model="tiny-llava", messages=messages(samples, *CASES[0]),
                                                   max_tokens=2)
    assert small.usage.completion_tokens <= 2


def test_serve_path_records_its_metrics(server, samples, ray_local):
    """Requests by status, time to first token, tokens, batch size and queue wait, as Prometheus sees them."""
    from conftest import scrape_until

    client(server).chat.completions.create(model="tiny-llava", messages=messages(samples, *CASES[1]))
    lines = scrape_until(ray_local, {
        "ray_pipeline_serve_requests_total", "ray_pipeline_serve_time_to_first_token_seconds_count",
        "ray_pipeline_serve_tokens_total", "ray_pipeline_serve_batch_size_count",
        "ray_pipeline_serve_queue_wait_seconds_count"})
    ok = [line for line in lines if line.startswith("ray_pipeline_serve_requests_total")
          and 'status="200"' in line and 'route="/v1/chat/completions"' in line]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1
    dashboard = json.loads((REPO / "cluster" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for name in ("ray_pipeline_serve_requests_total", "ray_pipeline_serve_time_to_first_token_seconds_bucket",
                 "ray_pipeline_serve_tokens_total", "ray_pipeline_serve_batch_size_bucket",
                 "ray_pipeline_serve_queue_wait_seconds_bucket"):
        assert name in exprs


def test_full_queue_answers_429_and_slow_requests_504(server, samples):
    body = {"model": "tiny-llava", "messages": messages(samples, *CASES[1])}

    async def burst():
        async with httpx2.AsyncClient(timeout=30) as http:
            first = asyncio.create_task(http.post(f"{server}/tight/v1/chat/completions", json=body))
            await asyncio.sleep(0.3)  # the first request now holds the only slot
            rest = [http.post(f"{server}/tight/v1/chat/completions", json=body) for _ in range(6)]
            return [await first, *await asyncio.gather(*rest)]

    replies = asyncio.run(burst())
    codes = Counter(r.status_code for r in replies)
    assert replies[0].status_code == 504 and replies[0].json()["error"]["code"] == "timeout"
    # One slot working, one queued: the burst is mostly refused. Those let in later may still be
    # answered (200) when the 3 s batch they join fires within their own second.
    assert codes[429] >= 3 and set(codes) <= {200, 429, 504}, codes
    assert all(r.headers.get("retry-after") == "1" for r in replies if r.status_code == 429)


# ---- configuration and URL rules without a server ----------------------------------------------

def test_check_uri_checks_every_resolved_address():
    def resolver(*addresses):
        return lambda host, port, proto=0: [(2, 1, 6, "", (a, 443)) for a in addresses]

    rules = (["https", "data", "s3"], ["https://", "s3://media/"])
    assert check_uri("https://cdn.example/a.png", *rules, resolve=resolver("93.184.215.14")) == "https"
    with pytest.raises(URLRejected, match="10.0.0.7"):  # one private address among public ones is enough
        check_uri("https://cdn.example/a.png", *rules, resolve=resolver("93.184.215.14", "10.0.0.7"))
    with pytest.raises(URLRejected, match="fd00:ec2::254"):  # the AWS IPv6 metadata address
        check_uri("https://meta.example/", *rules, resolve=resolver("fd00:ec2::254"))
    assert check_uri("data:image/png;base64,AAAA", *rules) == "data"
    assert check_uri("s3://media/a/b.mp4", *rules) == "s3"


def test_command_line_arguments_become_a_validated_config():
    cfg = parse_args({"model": "/m", "batch_size": "16", "max_new_tokens": "32", "device": "cuda",
                      "max_replicas": "4", "allowed_prefixes": "s3://a/,s3://b/", "storage.endpoint_url": "http://s3"})
    assert (cfg.batch_size, cfg.generation.max_new_tokens, cfg.allowed_prefixes) == (16, 32, ["s3://a/", "s3://b/"])
    assert cfg.storage.endpoint_url == "http://s3" and cfg.model_name() == "m"
    with pytest.raises(ValidationError, match="batch_sise"):
        parse_args({"model": "/m", "batch_sise": "16"})
    with pytest.raises(ValidationError, match="batch_size"):
        parse_args({"model": "/m", "batch_size": "0"})


def test_token_comes_from_the_environment_when_no_file(monkeypatch):
    """(With neither, the ingress refuses to start: tests/test_serve_security.py.)"""
    monkeypatch.setenv("PIPELINE_API_TOKEN", "from-env")
    assert load_token(ServeConfig(model="/m")) == "from-env"
    monkeypatch.delenv("PIPELINE_API_TOKEN")
    assert load_token(ServeConfig(model="/m")) is None


def test_serve_deploy_config_is_valid():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        assert app["import_path"] == "pipeline.serve:build_app"
        cfg = parse_args(app["args"])
        build_app(app["args"])  # the deployments' options are accepted by Serve
        # fail closed: the token comes from a mounted Secret, never from an open default
        assert cfg.device == "cuda" and cfg.max_replicas and cfg.api_token_file and not cfg.allow_unauthenticated


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.0.0.7", "169.254.169.254", "::1", "::", "fd00:ec2::254", "fe80::1%eth0",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1",  # IPv4-mapped
    "::127.0.0.1", "::8.8.8.8",  # IPv4-compatible (deprecated): never public
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::10.0.0.1",  # NAT64 well-known prefix, internal IPv4
    "64:ff9b:1::a00:1", "64:ff9b:1::808:808",  # RFC 8215 local-use NAT64: the translator decides
    "2002:7f00:1::1", "2002:a00:1::1", "2002:a9fe:a9fe::1",  # 6to4 of loopback, private, metadata
    "::ffff:0:127.0.0.1", "::ffff:0:a00:1",  # SIIT IPv4-translated
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
])
def test_internal_addresses_in_any_ipv6_spelling_are_not_public(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808",
                                     "2002:808:808::1"])
def test_public_addresses_stay_public(address):
    assert is_public_address(address)


def test_a_prompt_past_the_models_context_is_refused_with_the_numbers(server, samples):
    """The server's own cap (32,768) is above the tiny model's context (8,192): the model's decides."""
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": [
            image_part(samples, "photo.jpg"), {"type": "text", "text": "word " * 9000}]}])
    assert e.value.code == "prompt_too_long" and "context of 8,192 tokens" in str(e.value)


def test_loop_fighting_settings_from_the_config_and_the_request():
    """repetition_penalty and no_repeat_ngram_size are server settings (the batch job's generation fields);
    a request may set repetition_penalty (vLLM's extension, with transformers' meaning)."""
    from pipeline.serve.protocol import generation_for, parse_request

    cfg = parse_args({"model": "/m", "repetition_penalty": "1.2", "no_repeat_ngram_size": "3"})
    assert (cfg.generation.repetition_penalty, cfg.generation.no_repeat_ngram_size) == (1.2, 3)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert generation_for(parse_request(json.dumps(body).encode()), cfg.generation).repetition_penalty == 1.2
    asked = generation_for(parse_request(json.dumps({**body, "repetition_penalty": 1.05}).encode()), cfg.generation)
    assert (asked.repetition_penalty, asked.no_repeat_ngram_size) == (1.05, 3)
