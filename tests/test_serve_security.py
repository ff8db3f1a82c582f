"""The online endpoint attacked as a hostile client would, and the http(s) fetches of the batch job
and the server against DNS rebinding and redirects into the server's network.

Real components: a local Ray cluster with Serve, the tiny checkpoint, the official openai client,
real HTTP servers on loopback addresses. Loopback 127.0.0.2 stands for a public host (the rule
pipeline.io.urls.is_public_address is widened to it in-process); 127.0.0.1 is the internal target.
"""

import asyncio
import base64
import http.server
import socket
import threading
import time
from pathlib import Path

import httpx2
import openai
import pytest
from conftest import free_port

from pipeline.config import StorageConfig
from pipeline.serve import build_app
from tests.helpers.hostile_media import index_bomb_mp4, one_keyframe_video

TOKEN = "security-token-0123456789"
REQUEST_TIMEOUT_S = 12
DECODE_TIMEOUT_S = 2
BODY_TIMEOUT_S = 3


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    from ray import serve

    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN)
    app = build_app({"model": str(tiny_model), "served_model_name": "tiny-llava", "num_frames": "8",
                     "max_new_tokens": "4", "frontend_num_cpus": "0.5", "model_num_cpus": "0.5",
                     "api_token_file": str(token_file), "prepare_threads": "2", "max_prompt_tokens": "400",
                     "decode_timeout_s": str(DECODE_TIMEOUT_S), "request_timeout_s": str(REQUEST_TIMEOUT_S),
                     "body_timeout_s": str(BODY_TIMEOUT_S)})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="guarded", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def client(server, key=TOKEN):
    return openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=60)


def media_message(url: str, kind: str = "image_url", text: str = "Describe it.") -> list[dict]:
    return [{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": text}]}]


async def under_attack(server, samples: Path, attacks: list[list[dict]]) -> dict:
    from benchmarks.serve_attacks import under_attack as measure

    return await measure(server, TOKEN, "guarded", (samples / "photo.jpg").read_bytes(), attacks)


# ---- fail closed --------------------------------------------------------------------------------

def test_no_token_means_the_server_refuses_to_start(server, tiny_model):
    from ray import serve

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="Deploying application open failed"):
        serve.run(build_app({"model": str(tiny_model), "frontend_num_cpus": "0.1", "model_num_cpus": "0.1"}),
                  name="open", route_prefix="/open")
    print(f"refused to start in {time.monotonic() - started:.1f} s")
    try:
        assert "no API token" in serve.status().applications["open"].deployments["ChatIngress"].message
    finally:
        serve.delete("open")


def test_allow_unauthenticated_serves_and_warns_in_the_replica_log(server, tiny_model, samples, ray_local):
    from ray import serve

    serve.run(build_app({"model": str(tiny_model), "served_model_name": "tiny-llava", "max_new_tokens": "2",
                         "frontend_num_cpus": "0.1", "model_num_cpus": "0.1", "allow_unauthenticated": "true"}),
              name="open", route_prefix="/open")
    try:
        reply = openai.OpenAI(base_url=f"{server}/open/v1", api_key="anything", max_retries=0).chat.completions.create(
            model="tiny-llava", messages=media_message(data_url((samples / "logo.png").read_bytes(), "image/png")))
        assert reply.choices[0].message.content is not None
        logs = Path(ray_local._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
        replica_logs = " ".join(p.read_text() for p in logs.glob("replica_open_ChatIngress_*.log"))
        assert "allow_unauthenticated is set and no token is configured" in replica_logs
    finally:
        serve.delete("open")


def test_openapi_schema_needs_the_token(server):
    assert httpx2.get(f"{server}/openapi.json").status_code == 401
    r = httpx2.get(f"{server}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]
    assert httpx2.get(f"{server}/docs").status_code == 404


def test_prompts_over_the_token_limit_are_refused(server, samples):
    photo = data_url((samples / "logo.png").read_bytes(), "image/png")
    with pytest.raises(openai.BadRequestError) as e:
        asyncio.run(client(server).chat.completions.create(
            model="tiny-llava", messages=media_message(photo, text="word " * 5000)))
    assert e.value.code == "prompt_too_long" and "400" in str(e.value)


# ---- media decoded in the isolated child --------------------------------------------------------

def test_index_bomb_mp4_costs_the_ingress_nothing(server, samples, record_property):
    bomb = index_bomb_mp4((samples / "street.mp4").read_bytes())
    assert len(bomb) < 20_000
    result = asyncio.run(under_attack(server, samples, [media_message(data_url(bomb, "video/mp4"), "video_url")]))
    record_property("index_bomb", result)
    print("index bomb:", result)
    assert result["attack_statuses"] == [400]  # refused by the decoder child (memory limit), nothing more
    assert result["innocent_status"] == 200
    assert result["ingress_peak_growth_mb"] < 300  # it was +4 GB with decoding inside the ingress


def test_slow_one_keyframe_videos_do_not_hold_other_requests(server, samples, tmp_path, record_property):
    video = one_keyframe_video(tmp_path / "slow.mp4").read_bytes()
    assert len(video) < 600_000
    attack = media_message(data_url(video, "video/mp4"), "video_url")
    result = asyncio.run(under_attack(server, samples, [attack, attack]))  # as many as prepare_threads
    record_property("slow_video", result)
    print("slow one-keyframe videos:", result)
    # each decode is killed at decode_timeout_s: the innocent request gets a thread and its answer in time
    assert result["attack_statuses"] == [504, 504]
    assert result["innocent_status"] == 200 and result["innocent_s"] < REQUEST_TIMEOUT_S


def _trickle(server: str) -> bytes:
    """An authenticated client that sends a 2,000-byte body one byte at a time (at most ~200 s)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 2000\r\n\r\n".encode())
        s.settimeout(0.1)
        for _ in range(2000):
            try:
                s.sendall(b" ")
                answer = s.recv(65536)
                if answer:
                    return answer + s.recv(65536)
            except socket.timeout:
                continue
            except OSError:  # the server closed the connection
                break
    return b""


def test_clients_that_trickle_their_body_get_408_and_free_the_server(server, samples):
    """Four authenticated clients sending a 2,000-byte body at ~10 bytes/s used to hold the ingress
    (request_timeout_s started after the body was read): an innocent request timed out."""
    answers: list[bytes] = []
    slow = [threading.Thread(target=lambda: answers.append(_trickle(server))) for _ in range(4)]
    for t in slow:
        t.start()
    try:
        time.sleep(1)
        innocent = asyncio.run(client(server).chat.completions.create(
            model="tiny-llava", messages=media_message(data_url((samples / "photo.jpg").read_bytes(), "image/jpeg"))))
        assert innocent.choices[0].message.content is not None
    finally:
        for t in slow:  # each gives up by itself after its 2,000 bytes
            t.join()
    assert len(answers) == 4
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b'"code":"request_timeout"' in body.replace(b" ", b""), body[:300]


# ---- http(s) fetches: the checked address, no redirects, timeouts (batch job and server) ----------

class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files` with HEAD and Range (as fsspec reads), or redirects everything to `redirect`;
    with `stream`, as a streaming server would: no Content-Length, no ranges, the body ends when
    the connection closes."""

    files: dict[str, bytes] = {}
    redirect: str | None = None
    stream = False
    hits: list[str]

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        self.hits.append(self.path)
        if self.redirect:
            self.send_response(302)
            self.send_header("Location", self.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.files.get(self.path, b"")
        if self.stream:
            self.send_response(200)
            self.send_header("Accept-Ranges", "none")
            self.end_headers()
            if body:
                for i in range(0, len(data), 4096):
                    self.wfile.write(data[i:i + 4096])
            return
        start, end = 0, len(data) - 1
        ranged = self.headers.get("Range", "").startswith("bytes=")
        if ranged:
            first, _, last = self.headers["Range"][6:].partition("-")
            start, end = int(first), min(int(last or end), end)
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if body:
            self.wfile.write(data[start:end + 1])

    def log_message(self, *args):
        pass


def http_server(host: str, **attrs):
    handler = type("Handler", (_Handler,), {"hits": [], **attrs})
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


@pytest.fixture
def hosts(monkeypatch, samples):
    """("public" media host on 127.0.0.2, internal metadata host on 127.0.0.1), with 127.0.0.2 counted public."""
    from pipeline.io import urls

    public = urls.is_public_address
    monkeypatch.setattr(urls, "is_public_address", lambda a: a == "127.0.0.2" or public(a))
    media, media_handler = http_server("127.0.0.2", files={"/photo.jpg": (samples / "photo.jpg").read_bytes()})
    metadata, metadata_handler = http_server("127.0.0.1", files={"/latest/meta-data": b"secret-role-credentials"})
    yield media, media_handler, metadata, metadata_handler
    media.shutdown()
    metadata.shutdown()


def batch_fetch(uri: str, storage=StorageConfig()):
    from pipeline.media.fetch import fetch_and_decode

    return fetch_and_decode(uri, storage, "image", 1)


def server_fetch(uri: str, storage=StorageConfig(), max_media_bytes=2**20):
    """fetch_and_decode with the options the server's ingress gives it (what its decoder child runs)."""
    from pipeline.media.fetch import fetch_and_decode
    from pipeline.serve.config import ServeConfig
    from pipeline.serve.ingress import fetch_request

    cfg = ServeConfig(model="unused", storage=storage, max_media_bytes=max_media_bytes)
    return fetch_and_decode(**fetch_request(cfg, uri, uri, "image"))


FETCHERS = pytest.mark.parametrize("fetch", [batch_fetch, server_fetch], ids=["batch", "server"])


@FETCHERS
def test_a_public_host_is_fetched_through_the_pinned_connection(hosts, fetch):
    media, *_ = hosts
    decoded = fetch(f"http://127.0.0.2:{media.server_port}/photo.jpg")
    assert decoded.media_type == "image" and decoded.width > 0


@FETCHERS
def test_a_rebinding_resolver_cannot_point_the_fetch_at_loopback(hosts, monkeypatch, fetch):
    from pipeline.io.urls import check_uri
    from pipeline.media.decoded import MediaError

    media, _, metadata, metadata_handler = hosts
    real, answers = socket.getaddrinfo, iter(["127.0.0.2"])  # public for the check, then loopback

    def rebinding(host, port, *args, **kwargs):
        if host != "media.rebind.test":
            return real(host, port, *args, **kwargs)
        address = next(answers, "127.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    # one port for both hosts, as a real rebinding attack would have it: the metadata server's
    uri = f"http://media.rebind.test:{metadata.server_port}/latest/meta-data"
    check_uri(uri, ["http"], ["http://"], resolve=rebinding)  # the URL rules pass: 127.0.0.2 is "public"
    with pytest.raises(MediaError) as e:
        fetch(uri)
    assert metadata_handler.hits == []  # nothing reached the internal host
    # refused, and said so: it used to read "not_found ... does not exist; upload the file"
    assert e.value.error_type == "uri_not_allowed" and "non-public address (127.0.0.1)" in str(e.value), e.value


@FETCHERS
def test_a_redirect_to_loopback_is_not_followed(hosts, fetch):
    from pipeline.media.decoded import MediaError

    _, media_handler, metadata, metadata_handler = hosts
    media_handler.redirect = f"http://127.0.0.1:{metadata.server_port}/latest/meta-data"
    with pytest.raises(MediaError) as e:
        fetch(f"http://127.0.0.2:{hosts[0].server_port}/photo.jpg")
    assert media_handler.hits and metadata_handler.hits == []
    assert e.value.error_type == "uri_not_allowed" and "redirects are not followed" in str(e.value), e.value


@FETCHERS
def test_a_response_without_a_length_is_read_and_decoded(hosts, fetch):
    media, media_handler, *_ = hosts
    media_handler.stream = True
    decoded = fetch(f"http://127.0.0.2:{media.server_port}/photo.jpg")
    assert decoded.media_type == "image" and decoded.width > 0  # it was "undecodable: Cannot seek streaming HTTP file"


@pytest.mark.parametrize("stream", [True, False], ids=["no-length", "content-length"])
def test_the_servers_byte_limit_holds_with_or_without_a_declared_length(hosts, samples, stream):
    from pipeline.media.decoded import MediaError

    media, media_handler, *_ = hosts
    media_handler.stream = stream  # no-length: counted as the bytes arrive
    size = (samples / "photo.jpg").stat().st_size
    url = f"http://127.0.0.2:{media.server_port}/photo.jpg"
    with pytest.raises(MediaError) as e:
        server_fetch(url, max_media_bytes=size - 1)
    assert e.value.error_type == "media_too_large" and f"larger than {size - 1} bytes" in str(e.value)
    assert server_fetch(url, max_media_bytes=size).media_type == "image"  # exactly at the limit: read


@FETCHERS
def test_a_host_that_never_answers_times_out(hosts, fetch):
    from pipeline.media.decoded import MediaError

    silent = socket.create_server(("127.0.0.2", 0))  # accepts (the backlog) and never answers
    started = time.monotonic()
    try:
        with pytest.raises(MediaError):
            fetch(f"http://127.0.0.2:{silent.getsockname()[1]}/photo.jpg", StorageConfig(read_timeout_s=1))
    finally:
        silent.close()
    assert time.monotonic() - started < 10
