"""K questions about one item run the vision tower once for that item, not K times, and give the
same answers as K separate calls; also when the K rows are split over two generate calls."""

import json
import tempfile

import pyarrow.compute as pc
import pytest

from pipeline.batch.stages import Generate, Preprocess, decode_media, unpack
from pipeline.config import GenerationConfig, RunConfig
from pipeline.planning.manifest import scan_manifest
from tests.helpers.textmatch import mismatches, references

QUESTIONS = ["What is in it?", "What colors?", "Where is it?", "Is it day?"]


class VisionCounter:
    """Counts the vision tower's forward calls and the images/frames/patches they took."""

    def __init__(self, engine):
        self.calls = self.rows = 0
        engine.model.model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1
        self.rows += args[0].shape[0]


@pytest.fixture(scope="module")
def manifest(samples, tmp_path_factory):
    rows = [
        {"id": "photo", "uri": str(samples / "photo.jpg"), "questions": QUESTIONS},
        {"id": "pair", "uris": [str(samples / "logo.png"), str(samples / "palette.gif")], "questions": QUESTIONS[:3]},
        {"id": "street", "uri": str(samples / "street.mp4"), "questions": QUESTIONS[:2]},
    ]
    path = tmp_path_factory.mktemp("vision-once") / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("family", ["llava_onevision", "llava_interleave", "llava"])
def test_k_questions_encode_each_item_once(family, tiny_checkpoint, manifest):
    cfg = RunConfig(manifest=str(manifest), output="/unused", model=str(tiny_checkpoint(family)), task="qa",
                    num_frames=4, allowed_uri_prefixes=[tempfile.gettempdir()], generation=GenerationConfig(max_new_tokens=8))
    scan = scan_manifest(cfg)
    requests = Preprocess(cfg)(decode_media(scan.records, cfg, prefixes=scan.prefixes))
    requests = requests.filter(pc.equal(requests.column("status"), "ok"))  # LLaVA-1.5: the photo only
    items = {}  # item id -> vision rows one encoding of it takes
    generate = Generate(cfg, device="cpu")
    counter = VisionCounter(generate.engine)
    for r in requests.to_pylist():
        if r["id"] not in items:
            before = counter.rows
            generate.engine.vision.recent = {}
            generate.engine.generate([unpack(r["model_inputs"])], cfg.generation)
            items[r["id"]] = counter.rows - before
    k = requests.num_rows
    assert k == (4 if family == "llava" else 9) and len(items) == (1 if family == "llava" else 3)

    # K separate calls, nothing kept between them: the vision tower runs K times per item.
    separate, counter.calls, counter.rows = {}, 0, 0
    for r in requests.to_pylist():
        generate.engine.vision.recent = {}
        separate[(r["id"], r["prompt"])] = generate.engine.generate([unpack(r["model_inputs"])], cfg.generation)[0].text
    per_item_separate = counter.rows
    assert counter.calls == k

    # The pipeline's way, in batches of 2 (the K rows of an item straddle calls): once per item.
    counter.calls, counter.rows = 0, 0
    generate.engine.vision.recent = {}
    batched = {}
    for start in range(0, k, 2):
        for r in generate(requests.slice(start, 2)).to_pylist():
            batched[(r["id"], r["prompt"])] = r["text"]
    assert counter.rows == sum(items.values()) < per_item_separate
    assert counter.calls == len(items)
    # equal text, up to ties the reference itself cannot tell apart (tests/helpers/textmatch.py)
    refs = references(generate.engine.model, generate.engine.tokenizer, requests.to_pylist(), cfg.generation.max_new_tokens)
    assert mismatches(refs, generate.engine.tokenizer, separate) == {}
    assert mismatches(refs, generate.engine.tokenizer, batched) == {}


def test_the_feature_cache_is_bounded_and_keeps_the_current_call(tiny_checkpoint, manifest, monkeypatch):
    cfg = RunConfig(manifest=str(manifest), output="/unused", model=str(tiny_checkpoint("llava_onevision")),
                    task="qa", num_frames=4, allowed_uri_prefixes=[tempfile.gettempdir()],
                    generation=GenerationConfig(max_new_tokens=2))
    scan = scan_manifest(cfg)
    requests = Preprocess(cfg)(decode_media(scan.records, cfg, prefixes=scan.prefixes)).to_pylist()
    engine = Generate(cfg, device="cpu").engine
    first = {r["id"]: unpack(r["model_inputs"]) for r in requests}  # one row per item
    engine.generate(list(first.values()), cfg.generation)
    assert len(engine.vision.recent) == 3  # within the budget: all kept
    monkeypatch.setattr("pipeline.model.vision.CACHE_TOKENS", 0)
    engine.generate([first["street"]], cfg.generation)
    assert len(engine.vision.recent) == 1  # over it: only the media of the call just made
