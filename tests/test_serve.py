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
import openai
import pytest
import yaml
from pydantic import ValidationError

from conftest import REPO, free_port
from pipeline.config import GenerationConfig, RunConfig
from pipeline.manifest import scan_manifest
from pipeline.serve import ServeConfig, build_app, load_token, parse_args
from pipeline.stages import Generate, Preprocess, decode_media
from pipeline.urls import URLRejected, check_uri

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
                      "api_token_file": str(token_file)})
    # One request at a time, one queue slot, and a batch wait longer than the timeout: overload on demand.
    tight = build_app({**common, "batch_size": "16", "batch_wait_timeout_s": "3", "request_timeout_s": "1",
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
    rows = Generate(cfg, device="cpu")(Preprocess(cfg)(decode_media(scan_manifest(cfg).records, cfg))).to_pylist()
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    return {r["id"]: r for r in rows}


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
        assert reply.choices[0].message.content == expected["text"], name
        assert reply.usage.prompt_tokens == expected["prompt_tokens"]
        assert reply.usage.completion_tokens == expected["output_tokens"]
        assert reply.usage.total_tokens == expected["prompt_tokens"] + expected["output_tokens"]
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
        assert text == batch_texts[name]["text"], name
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


def test_stream_is_refused_clearly(server, samples):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="tiny-llava", messages=messages(samples, *CASES[0]), stream=True)
    assert e.value.code == "stream_unsupported"


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
        assert cfg.device == "cuda" and cfg.max_replicas and cfg.api_token_file is None
