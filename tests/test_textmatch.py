"""The rule that decides when two generations of a random-weight checkpoint count as the same
(tests/helpers/textmatch.py): it passes the pipeline's batched text on any machine and catches
real faults (right padding instead of left, another row's prompt)."""

import json
import tempfile

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.batch.stages import Generate, Preprocess, decode_media, unpack
from pipeline.config import GenerationConfig, RunConfig
from pipeline.model.engine import Engine
from pipeline.planning.manifest import scan_manifest
from tests.helpers.textmatch import TOLERANCE, Reference, difference, mismatches, references

MAX_NEW_TOKENS = 10


class ByteTokenizer:
    """Token i decodes to chr(ord('a') + i); token 9 is end-of-sequence (decodes to nothing)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids if i != 9)


def logits(*pairs):
    out = torch.full((10,), -5.0)
    for token, value in pairs:
        out[token] = value
    return out


def test_the_rule_accepts_a_tie_and_refuses_a_gap():
    tok = ByteTokenizer()
    ref = Reference("abc", [0, 1, 2], [logits((0, 3.0)), logits((1, 2.0), (4, 2.0 - TOLERANCE / 2)), logits((2, 1.0))])
    assert difference(ref, tok, "abc") is None
    assert difference(ref, tok, "aexyz") is None  # parted at a tie: what follows is not compared
    ref_gap = Reference("abc", [0, 1, 2], [logits((0, 3.0)), logits((1, 2.0), (4, 2.0 - 10 * TOLERANCE)),
                                           logits((2, 1.0))])
    assert "parted from the reference at step 1" in difference(ref_gap, tok, "aexyz")
    # stopping early is a parting too: end-of-sequence must be tied with the reference's token
    assert difference(Reference("ab", [0, 1], [logits((0, 3.0)), logits((1, 2.0), (9, 2.0))]), tok, "a") is None
    assert difference(Reference("ab", [0, 1], [logits((0, 3.0)), logits((1, 2.0), (9, 1.0))]), tok, "a") is not None
    assert difference(ref, tok, "abcd") is not None  # longer than the reference, not by a tie


@pytest.fixture(scope="module")
def rows(samples, tiny_model, tmp_path_factory):
    manifest = tmp_path_factory.mktemp("textmatch") / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "street", "uri": str(samples / "street.mp4")},
        {"id": "photo", "uri": str(samples / "photo.jpg"), "questions": ["What is in it?", "Describe the scene in it."]},
        {"id": "logo", "uri": str(samples / "logo.png"), "questions": ["Any text?"]},
        {"id": "pair", "uris": [str(samples / "logo.png"), str(samples / "palette.gif")]},
    ]))
    cfg = RunConfig(manifest=str(manifest), output="/unused", model=str(tiny_model), task="qa", prompt="What?",
                    num_frames=4, allowed_uri_prefixes=[tempfile.gettempdir()],
                    generation=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS))
    scan = scan_manifest(cfg)
    requests = Preprocess(cfg)(decode_media(scan.records, cfg, prefixes=scan.prefixes)).to_pylist()
    assert len(requests) == 5 and len({len(unpack(r["model_inputs"])["input_ids"]) for r in requests}) > 2
    engine = Engine(str(tiny_model), device="cpu")
    return cfg, requests, engine, references(engine.model, engine.tokenizer, requests, MAX_NEW_TOKENS)


def batched_texts(engine, cfg, requests) -> dict:
    results = engine.generate([unpack(r["model_inputs"]) for r in requests], cfg.generation)
    return {(r["id"], r["prompt"]): g.text for r, g in zip(requests, results)}


def test_the_pipelines_batched_text_matches(rows):
    cfg, requests, engine, refs = rows
    assert mismatches(refs, engine.tokenizer, batched_texts(engine, cfg, requests)) == {}
    staged = {(r["id"], r["prompt"]): r["text"] for r in Generate(cfg, device="cpu")(pa.Table.from_pylist(requests)).to_pylist()}
    assert mismatches(refs, engine.tokenizer, staged) == {}
    assert len(set(staged.values())) == len(staged)  # the texts differ from row to row: the check has teeth


def test_right_padding_is_caught(rows, monkeypatch):
    cfg, requests, engine, refs = rows

    def right_padded(inputs):
        width = max(len(x["input_ids"]) for x in inputs)
        ids = np.full((len(inputs), width), engine.pad_id, dtype=np.int64)
        mask = np.zeros((len(inputs), width), dtype=np.int64)
        for row, x in enumerate(inputs):
            ids[row, :len(x["input_ids"])] = x["input_ids"]
            mask[row, :len(x["input_ids"])] = 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}

    monkeypatch.setattr(engine, "collate", right_padded)
    found = mismatches(refs, engine.tokenizer, batched_texts(engine, cfg, requests))
    assert len(found) >= 2, found  # every row but the longest is padded on the wrong side
    assert all("no token within" in why for why in found.values())


def test_another_rows_text_is_caught(rows):
    cfg, requests, engine, refs = rows
    texts = batched_texts(engine, cfg, requests)
    keys = list(texts)
    shifted = {k: texts[keys[(i + 1) % len(keys)]] for i, k in enumerate(keys)}
    assert len(mismatches(refs, engine.tokenizer, shifted)) == len(keys)
