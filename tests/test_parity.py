"""The pipeline's text equals the model card's reference usage (processor + generate, batch size 1),
for images, videos, several questions about one item, and a mixed batch: token for token, up to
ties the reference itself cannot tell apart (tests/helpers/textmatch.py)."""

import json
import tempfile

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from pipeline.batch.stages import Generate, Preprocess, decode_media
from pipeline.config import GenerationConfig, RunConfig
from pipeline.planning.manifest import scan_manifest
from tests.helpers.textmatch import difference, generate_reference, mismatches, references

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def reference(tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def run(uri, media_type, prompt, timestamps=None):
        conversation = [{"role": "user", "content": [{"type": media_type}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        if media_type == "image":
            image = ImageOps.exif_transpose(Image.open(uri))  # the pipeline shows photos upright
            inputs = processor(images=image, text=text, return_tensors="pt")
        else:  # the card's read_video_pyav: decode every frame, keep the chosen ones
            with av.open(uri) as container:
                wanted = {round(t, 4) for t in timestamps}
                frames = {round(float(f.time), 4): f.to_ndarray(format="rgb24") for f in container.decode(video=0)}
            video = np.stack([frames[round(t, 4)] for t in timestamps])
            assert len(wanted) <= len(video)
            inputs = processor(videos=video, text=text, return_tensors="pt")
        return generate_reference(model, processor.tokenizer, inputs, MAX_NEW_TOKENS)

    run.tokenizer = processor.tokenizer
    run.model = model
    return run


@pytest.fixture(scope="module")
def manifest(samples, tmp_path_factory):
    extra = tmp_path_factory.mktemp("parity")
    wide = extra / "wide.png"  # another aspect ratio: a different anyres patch count in the same batch
    Image.fromarray((np.random.RandomState(3).rand(40, 200, 3) * 255).astype(np.uint8)).save(wide)
    rows = [
        {"id": "street", "uri": str(samples / "street.mp4")},
        {"id": "photo", "uri": str(samples / "photo.jpg"), "prompt": "Describe this photo."},
        {"id": "beach", "uri": str(samples / "beach.webm"), "questions": ["What moves?", "What colors?", "Where?"]},
        {"id": "wide", "uri": str(wide)},
        {"id": "logo", "uri": str(samples / "logo.png"), "questions": ["Any text?", "What shape?"]},
        {"id": "palette", "uri": str(samples / "palette.gif")},
        {"id": "clip", "uri": str(samples / "long_gop.mp4"), "start_s": 2, "end_s": 8},
    ]
    path = extra / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pipeline_rows(cfg, batch_size):
    """decode -> preprocess -> generate, as plain Python, in batches of batch_size."""
    scan = scan_manifest(cfg)
    items = decode_media(scan.records, cfg, prefixes=scan.prefixes)
    requests = Preprocess(cfg)(items)
    generate = Generate(cfg, device="cpu")
    out = []
    for start in range(0, requests.num_rows, batch_size):
        out += generate(requests.slice(start, batch_size)).to_pylist()
    return out


def config(manifest, model, **gen):
    return RunConfig(manifest=str(manifest), output="/unused", model=str(model), task="qa",
                     prompt="What is in it?", num_frames=6, allowed_uri_prefixes=[tempfile.gettempdir()],
                     generation=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, **gen))


def test_mixed_batch_equals_reference_one_by_one(manifest, tiny_model, reference):
    rows = pipeline_rows(config(manifest, tiny_model), batch_size=16)  # everything in one batch
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    media = {r["media_type"] for r in rows}
    assert media == {"image", "video"}
    assert len({r["prompt_tokens"] for r in rows if r["media_type"] == "image"}) > 1  # different patch counts
    texts = set()
    for r in rows:
        expected = reference(r["uri"], r["media_type"], r["prompt"], r["frame_timestamps_s"])
        assert difference(expected, reference.tokenizer, r["text"]) is None, (r["id"], r["prompt"])
        texts.add(r["text"])
    assert len(texts) > 5  # the check compares text that differs from input to input


def test_batch_size_does_not_change_text(manifest, tiny_model, reference):
    cfg = config(manifest, tiny_model)
    scan = scan_manifest(cfg)
    refs = references(reference.model, reference.tokenizer, Preprocess(cfg)(decode_media(scan.records, cfg, prefixes=scan.prefixes)).to_pylist(),
                      MAX_NEW_TOKENS)
    for batch_size in (5, 1):
        texts = {(r["id"], r["prompt"]): r["text"] for r in pipeline_rows(cfg, batch_size=batch_size)}
        assert mismatches(refs, reference.tokenizer, texts) == {}, batch_size


def test_sampling_is_deterministic_per_seed_and_independent_of_batching(manifest, tiny_model):
    cfg = config(manifest, tiny_model, temperature=1.0, top_p=0.9, seed=7)
    a = {(r["id"], r["prompt"]): r["text"] for r in pipeline_rows(cfg, batch_size=10)}
    b = {(r["id"], r["prompt"]): r["text"] for r in pipeline_rows(cfg, batch_size=3)}
    assert a == b
    greedy = {(r["id"], r["prompt"]): r["text"] for r in pipeline_rows(config(manifest, tiny_model), batch_size=10)}
    other_seed = {(r["id"], r["prompt"]): r["text"]
                  for r in pipeline_rows(config(manifest, tiny_model, temperature=1.0, top_p=0.9, seed=8), 10)}
    assert a != greedy and a != other_seed


def test_resize_in_decoder_gives_identical_model_inputs(manifest, tiny_model):
    from pipeline.batch.stages import unpack, video_resize

    runs = {}
    for resize in (True, False):
        cfg = config(manifest, tiny_model).model_copy(update={"resize_in_decoder": resize})
        scan = scan_manifest(cfg)
        items = decode_media(scan.records, cfg, video_resize(cfg), prefixes=scan.prefixes)  # as run.py hands it over
        frames = {r["id"]: unpack(r["frames"])["frames"].shape for r in items.to_pylist() if r["media_type"] == "video"}
        runs[resize] = frames, Preprocess(cfg)(items).to_pylist()
    (small, resized), (full, plain) = runs[True], runs[False]
    assert set(small.values()) == {(6, 32, 32, 3)} and all(s[1:3] != (32, 32) for s in full.values())
    for a, b in zip(resized, plain):
        x, y = unpack(a["model_inputs"]), unpack(b["model_inputs"])
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), a["id"]


def test_decoders_take_the_resize_as_data_and_never_read_the_checkpoint(manifest, tiny_model, tmp_path):
    """The driver reads the video resize once (stages.video_resize); the decode stage gets it as an
    argument, so a decode worker whose node cannot see the checkpoint still resizes."""
    from pipeline.batch.stages import unpack, video_resize

    resize = video_resize(config(manifest, tiny_model))
    assert resize and (resize["height"], resize["width"]) == (32, 32)
    elsewhere = config(manifest, tmp_path / "not-on-this-node")  # no checkpoint where the decoder runs
    scan_elsewhere = scan_manifest(elsewhere)
    items = decode_media(scan_elsewhere.records, elsewhere, resize, prefixes=scan_elsewhere.prefixes).to_pylist()
    shapes = {unpack(r["frames"])["frames"].shape for r in items if r["media_type"] == "video"}
    assert shapes == {(6, 32, 32, 3)}
