"""A prompt past the model's context is an error row (batch) or a 400 (server), with the numbers:
it used to make an `ok` row of 60,045 tokens on a model trained on 8,192."""

import numpy as np
import pyarrow as pa

from pipeline.batch.stages import ITEM_SCHEMA, Preprocess, pack
from pipeline.config import RunConfig
from pipeline.model.preprocess import Preprocessor, PromptTooLong


def _items(prompts: list[str]) -> pa.Table:
    frame = np.random.default_rng(0).integers(0, 255, (1, 64, 48, 3), dtype=np.uint8)
    item = {"id": "photo", "uri": "photo.jpg", "source": "m.jsonl:line 1", "status": "ok", "media_type": "image",
            "num_frames": 1, "width": 48, "height": 64, "prompts": prompts, "frames": pack({"frames": frame})}
    return pa.Table.from_pylist([item], schema=ITEM_SCHEMA)


def test_a_prompt_past_the_models_context_is_an_error_row_with_the_numbers(tiny_model):
    cfg = RunConfig(manifest="/tmp/m.jsonl", output="/tmp/unused", model=str(tiny_model))
    stage = Preprocess(cfg)
    assert stage.preprocessor.context_tokens == 8192  # the tiny checkpoint's text model
    rows = stage(_items(["Describe this image.", "word " * 20_000])).to_pylist()
    ok, long = rows
    assert ok["status"] == "ok" and ok["model_inputs"]
    assert long["status"] == "error" and long["error_type"] == "prompt_too_long", long
    assert f"{long['prompt_tokens']:,} tokens" in long["error"] and "context of 8,192" in long["error"]
    assert long["model_inputs"] is None


def test_the_answer_must_fit_too(tiny_model):
    p = Preprocessor(str(tiny_model))
    p.check_fits(8192 - 64, 64)  # exactly full: fits
    for prompt, new in ((8192 - 63, 64), (8193, 1)):
        try:
            p.check_fits(prompt, new)
        except PromptTooLong as e:
            assert e.error_type == "prompt_too_long" and f"max_new_tokens {new}" in str(e)
        else:
            raise AssertionError(f"{prompt} + {new} tokens fit a context of 8192")
