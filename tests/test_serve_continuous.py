"""The model deployment under continuous scheduling, called as plain Python (no Serve): a request
joins the running batch at the next step (it does not wait for a long stream to end), its text is
the reference's, and a client that goes away stops its row within a step."""

import asyncio

import numpy as np
import pytest
from PIL import Image

from pipeline.config import GenerationConfig
from pipeline.model.preprocess import Preprocessor
from pipeline.serve.config import ServeConfig
from pipeline.serve.model import Job, LlavaModel
from tests.helpers.textmatch import difference, reference_generation

LONG, SHORT = 150, 4


@pytest.fixture(scope="module")
def deployment(tiny_model, samples):
    model = LlavaModel.func_or_class(ServeConfig(model=str(tiny_model), device="cpu", batch_size=4))
    assert model.scheduler is not None
    pre = Preprocessor(str(tiny_model))
    photo = pre.build("image", [np.asarray(Image.open(samples / "photo.jpg").convert("RGB"))], "What is in it?")
    logo = pre.build("image", [np.asarray(Image.open(samples / "logo.png").convert("RGB"))], "Any text?")
    return model, photo, logo


def test_a_request_joins_a_running_stream_and_a_gone_client_stops_its_row(deployment):
    model, photo, logo = deployment
    engine = model.engine
    ref = reference_generation(engine.model, engine.tokenizer, logo, SHORT)
    assert len(ref.token_ids) == SHORT and not set(ref.token_ids) & engine.eos_ids  # no end token: 4 tokens
    saved, engine.eos_ids = engine.eos_ids, set()  # the long row must not end early by chance (random weights)

    async def scenario():
        long_tokens, short_done = [], {}
        long = model.generate(Job(photo, GenerationConfig(max_new_tokens=LONG), seed=0))

        async def read_long():
            async for events in long:
                long_tokens.extend(e["text"] for e in events if "text" in e)
                if short_done and len(long_tokens) >= short_done["long_tokens"] + 3:
                    return  # the client goes away mid-stream

        reader = asyncio.ensure_future(read_long())
        while len(long_tokens) < 5:
            await asyncio.sleep(0.01)
        text, last = "", {}
        async for events in model.generate(Job(logo, GenerationConfig(max_new_tokens=SHORT), seed=0)):
            for e in events:
                text += e.get("text", "")
                last = e
        short_done.update(long_tokens=len(long_tokens), steps=model.scheduler.steps)
        await reader
        await long.aclose()  # as Serve does when the ingress cancels the response
        gone_at = model.scheduler.steps
        while not model.scheduler.idle:
            await asyncio.sleep(0.01)
        return text, last, short_done, gone_at, len(long_tokens)

    try:
        text, last, short_done, gone_at, long_count = asyncio.run(scenario())
    finally:
        engine.eos_ids = saved
    assert difference(ref, engine.tokenizer, text) is None
    assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == SHORT
    assert last["batch_size"] == 2  # it joined the running long row
    assert short_done["long_tokens"] < LONG - 10  # it ended while the long stream ran, not after it
    assert model.scheduler.steps <= gone_at + 2  # the abandoned row left within a step or two
    assert long_count < LONG - 10
