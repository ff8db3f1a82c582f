"""Every LLaVA family through the same stages: the family is read from the checkpoint's config, the
prompt follows its model card, and the text equals the card's reference usage token for token
(one image, several images in one prompt, video), in one mixed batch."""

import json
import tempfile

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaOnevisionConfig,
    Qwen2Config,
)

from pipeline.batch.stages import Generate, Preprocess, decode_media
from pipeline.config import GenerationConfig, RunConfig
from pipeline.model.families import detect_family
from pipeline.model.preprocess import Preprocessor
from pipeline.planning.manifest import scan_manifest
from tests.helpers.textmatch import difference, generate_reference

MAX_NEW_TOKENS = 10
FAMILIES = ["llava_onevision", "llava_interleave", "llava"]


def test_family_is_read_from_the_config():
    assert detect_family(LlavaOnevisionConfig()).name == "llava_onevision"
    assert detect_family(LlavaConfig(text_config=Qwen2Config().to_dict())).name == "llava_interleave"
    assert detect_family(LlavaConfig(text_config=LlamaConfig().to_dict())).name == "llava"
    with pytest.raises(ValueError, match="not a supported LLaVA family"):
        detect_family(Qwen2Config())


@pytest.mark.parametrize("family, expected", [
    ("llava_onevision", "<|im_start|>user\n<image>\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"),
    ("llava_interleave", "<|im_start|>user <image><image>\nWhat is it?<|im_end|><|im_start|>assistant"),
    ("llava", "USER: <image>\n<image>\nWhat is it? ASSISTANT:"),
])
def test_prompt_follows_the_model_card(tiny_checkpoint, family, expected):
    pre = Preprocessor(str(tiny_checkpoint(family)))
    assert pre.family.name == family
    assert pre.prompt_text("image", "What is it?", num_images=2) == expected


@pytest.fixture(scope="module")
def manifest(samples, tmp_path_factory):
    extra = tmp_path_factory.mktemp("families")
    wide = extra / "wide.png"  # another aspect ratio beside the logo in one prompt
    Image.fromarray((np.random.RandomState(5).rand(40, 200, 3) * 255).astype(np.uint8)).save(wide)
    rows = [
        {"id": "photo", "uri": str(samples / "photo.jpg"), "questions": ["What is in it?", "What colors?"]},
        {"id": "pair", "uris": [str(samples / "logo.png"), str(wide)], "questions": ["How do they differ?"]},
        {"id": "street", "uri": str(samples / "street.mp4"), "questions": ["What moves?"]},
        {"id": "gone", "uris": [str(samples / "logo.png"), str(extra / "missing.png")], "questions": ["Any?"]},
    ]
    path = extra / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def card_reference(family, path):
    """The model card's usage, one (item, prompt) at a time: chat template, processor, generate."""
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    def run(row):
        if row["media_type"] == "image":
            media = [ImageOps.exif_transpose(Image.open(u)) for u in row["uris"] or [row["uri"]]]
        else:  # the card's read_video_pyav: decode every frame, keep the chosen ones
            with av.open(row["uri"]) as container:
                frames = {round(float(f.time), 4): f.to_ndarray(format="rgb24") for f in container.decode(video=0)}
            media = [frames[round(t, 4)] for t in row["frame_timestamps_s"]]
        native_video = row["media_type"] == "video" and family == "llava_onevision"
        parts = [{"type": "video"}] if native_video else [{"type": "image"}] * len(media)  # Interleave: frames as images
        text = processor.apply_chat_template(
            [{"role": "user", "content": [*parts, {"type": "text", "text": row["prompt"]}]}], add_generation_prompt=True)
        if native_video:
            inputs = processor(videos=np.stack(media), text=text, return_tensors="pt")
        elif family == "llava_onevision" and len(media) > 1:  # several images of one prompt: nested
            inputs = processor(images=[media], text=[text], return_tensors="pt")
        else:
            inputs = processor(images=media if len(media) > 1 else media[0], text=text, return_tensors="pt")
        return generate_reference(model, processor.tokenizer, inputs, MAX_NEW_TOKENS)

    run.tokenizer = processor.tokenizer
    return run


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_the_card_reference(family, tiny_checkpoint, manifest, monkeypatch):
    monkeypatch.setattr("pipeline.model.batching.MIN_BATCH_FILL", 0.0)  # every length in one generate call
    path = tiny_checkpoint(family)
    cfg = RunConfig(manifest=str(manifest), output="/unused", model=str(path), task="qa", num_frames=4,
                    allowed_uri_prefixes=[tempfile.gettempdir()],
                    generation=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS))
    scan = scan_manifest(cfg)
    requests = Preprocess(cfg)(decode_media(scan.records, cfg, prefixes=scan.prefixes))
    rows = {(r["id"], r["prompt"]): r for r in Generate(cfg, device="cpu")(requests).to_pylist()}  # one batch
    assert len(rows) == 5
    gone = rows[("gone", "Any?")]
    assert (gone["status"], gone["error_type"], gone["uri"]) == ("error", "not_found", None)
    pair = rows[("pair", "How do they differ?")]
    assert pair["uris"] == json.loads(manifest.read_text().splitlines()[1])["uris"]
    assert pair["media_type"] == "image" and pair["num_frames"] == 2
    if family == "llava":  # one image per prompt: video and several-image rows are error rows
        for key in [("pair", "How do they differ?"), ("street", "What moves?")]:
            assert (rows[key]["status"], rows[key]["error_type"]) == ("error", "unsupported_media"), rows[key]
            assert "LLaVA-1.5 takes one image" in rows[key]["error"]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == (2 if family == "llava" else 4)
    reference = card_reference(family, path)
    for r in ok:  # token for token, up to ties the reference cannot tell apart (tests/helpers/textmatch.py)
        assert difference(reference(r), reference.tokenizer, r["text"]) is None, (r["id"], r["prompt"])
    assert len({r["text"] for r in ok}) == len(ok)  # the comparison is between texts that differ
