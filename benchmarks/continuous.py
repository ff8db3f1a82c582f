"""Continuous vs static batching, side by side on one engine in one run (issue 23).

- batch: items/s on rows whose answers end at varied lengths. The lengths are honest caption
  lengths, not one fixed budget: each row's max_new_tokens is drawn from a log-normal (median
  LENGTH_MEDIAN tokens, clipped to [LENGTH_MIN, LENGTH_MAX]), as real captions end at EOS after
  tens to hundreds of tokens. Static: batches of batch_size rows in order, each one
  model.generate to its longest row (what generate does when rows end at EOS at those lengths: it
  runs until the last row ends); continuous: the engine's scheduler with batch_size slots, each
  row leaving at its own length and the next joining. Both give every row the same tokens.
- fixed: the same with every row running to the same max_new_tokens (continuous must not be slower).
- abandoned: the latency of a short request, idle and after 8 long streams whose clients left
  (measure_abandoned says how each side is run).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

LENGTH_MEDIAN, LENGTH_MIN, LENGTH_MAX = 40, 8, 160


def caption_lengths(n: int, seed: int = 0, median: int = LENGTH_MEDIAN, low: int = LENGTH_MIN, high: int = LENGTH_MAX) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(np.round(rng.lognormal(np.log(median), 0.8, n)), low, high)]


def model_inputs(model_path: str, n: int, seed: int = 0) -> list[dict]:
    """n rows: images of a few sizes and short videos (synthetic pixels), through the checkpoint's processor."""
    from pipeline.model.preprocess import Preprocessor

    pre = Preprocessor(model_path)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if i % 3 == 2:
            frames = (rng.random((4, 64, 64, 3)) * 255).astype(np.uint8)
            rows.append(pre.build("video", frames, f"Describe video {i}."))
        else:
            side = (48, 96)[i % 2]
            rows.append(pre.build("image", [(rng.random((side, side + 16 * (i % 3), 3)) * 255).astype(np.uint8)],
                                  f"Describe image {i}."))
    return rows


def _static(engine, inputs, lengths, batch_size) -> list:
    from pipeline.config import GenerationConfig

    engine.continuous = False
    try:
        out = []
        for s in range(0, len(inputs), batch_size):
            batch = inputs[s:s + batch_size]
            gen = GenerationConfig(max_new_tokens=max(lengths[s:s + batch_size]))
            out += engine.generate(batch, gen, [0] * len(batch))
        return out
    finally:
        engine.continuous = True


def _continuous(engine, inputs, lengths, batch_size) -> list:
    from pipeline.config import GenerationConfig
    from pipeline.model.continuous import Row

    return engine.scheduler(max_rows=batch_size).run([Row(x, GenerationConfig(max_new_tokens=n)) for x, n in zip(inputs, lengths)])


def measure_batch(model_path: str, rows: int = 24, batch_size: int = 4, fixed_tokens: int = 32, repeats: int = 1,
                  device: str | None = "cpu", longest: int = LENGTH_MAX, log=print) -> dict:
    """device None: cuda when there is one; longest: the lengths' upper clip (small for a check run)."""
    from pipeline.model.engine import Engine

    engine = Engine(model_path, device=device or "auto")
    engine.eos_ids = set()  # rows end at their drawn lengths (random weights would end some at random)
    inputs = model_inputs(model_path, rows)
    lengths = caption_lengths(rows, median=min(LENGTH_MEDIAN, longest // 2), low=min(LENGTH_MIN, longest), high=longest)
    _continuous(engine, inputs[:2], [2, 2], batch_size)  # warm-up; vision features cached for both sides alike
    engine.vision.encoder_outputs(inputs)
    result = {"rows": rows, "batch_size": batch_size, "lengths": lengths, "device": str(engine.device),
              "lengths_rule": f"per-row max_new_tokens ~ lognormal(median {LENGTH_MEDIAN}, sigma 0.8) in [{LENGTH_MIN}, {LENGTH_MAX}]",
              "prompt_tokens": [len(x["input_ids"]) for x in inputs]}
    for name, lens in (("varied", lengths), ("fixed", [fixed_tokens] * rows)):
        timings = {"static": [], "continuous": []}
        for _ in range(repeats):
            for side, fn in (("static", _static), ("continuous", _continuous)):
                t = time.perf_counter()
                out = fn(engine, inputs, lens, batch_size)
                timings[side].append(time.perf_counter() - t)
                if side == "continuous":  # static rows run on to their batch's longest (cut afterwards)
                    assert [r.output_tokens for r in out] == lens
        best = {k: min(v) for k, v in timings.items()}
        result[name] = {"static_items_per_s": round(rows / best["static"], 3),
                        "continuous_items_per_s": round(rows / best["continuous"], 3),
                        "speedup": round(best["static"] / best["continuous"], 2),
                        "static_steps": sum(max(lens[s:s + batch_size]) for s in range(0, rows, batch_size)),
                        "useful_tokens": sum(lens)}
        log(f"continuous batch ({name} lengths): {result[name]['continuous_items_per_s']} vs static "
            f"{result[name]['static_items_per_s']} items/s (x{result[name]['speedup']})")
    return result


def measure_abandoned(model_path: str, streams: int = 8, long_tokens: int = 400, short_tokens: int = 4, log=print) -> dict:
    """Continuous: through the model deployment's own code (LlavaModel as plain Python): 8 streams
    read for 3 events each, then closed (as Serve does when a client leaves), then a short request.
    Static: @serve.batch needs a Serve replica, so its behaviour is reproduced on the same engine:
    the 8 long rows in one model.generate (which cannot drop rows), then the short request's call
    (one call at a time on a replica's model); the latency counts from the 3rd token of the long call."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.config import GenerationConfig
    from pipeline.serve.config import ServeConfig
    from pipeline.serve.model import Job, LlavaModel

    inputs = model_inputs(model_path, streams + 1)
    result = {"streams": streams, "long_tokens": long_tokens, "short_tokens": short_tokens}
    model = LlavaModel.func_or_class(ServeConfig(model=model_path, device="cpu", batch_size=streams))
    engine = model.engine
    engine.eos_ids = set()  # the long rows run to their budget unless dropped
    short_gen, long_gen = GenerationConfig(max_new_tokens=short_tokens), GenerationConfig(max_new_tokens=long_tokens)

    # static
    engine.continuous = False
    pool = ThreadPoolExecutor(max_workers=1)

    def static_short() -> float:
        t = time.perf_counter()
        pool.submit(engine.generate, [inputs[-1]], short_gen).result()
        return time.perf_counter() - t

    class ThirdToken:
        def __init__(self):
            self.steps, self.seen = 0, threading.Event()

        def put(self, value):
            self.steps += 1
            if self.steps == 4:  # the prompt, then 3 tokens
                self.seen.set()

        def end(self):
            pass

    static_short()
    idle = min(static_short() for _ in range(3))
    streamer = ThirdToken()
    pool.submit(engine.generate, inputs[:streams], long_gen, None, streamer)
    streamer.seen.wait()
    after = static_short()
    result["static"] = {"idle_s": round(idle, 3), "after_abandoned_s": round(after, 3), "ratio": round(after / idle, 2)}
    log(f"short request after {streams} abandoned streams (static): {after:.3f} s vs {idle:.3f} s idle")
    pool.shutdown()
    engine.continuous = True

    # continuous, through the deployment
    async def short():
        t = time.perf_counter()
        async for events in model.generate(Job(inputs[-1], short_gen, 0)):
            if any("finish_reason" in e for e in events):
                break
        return time.perf_counter() - t

    async def abandon(x):
        gen = model.generate(Job(x, long_gen, 0))
        seen = 0
        async for events in gen:
            seen += len(events)
            if seen >= 3:
                break
        await gen.aclose()  # the client leaves

    async def scenario():
        await short()  # warm-up
        idle = min([await short() for _ in range(3)])
        await asyncio.gather(*(abandon(x) for x in inputs[:streams]))
        after = await short()
        return idle, after

    idle, after = asyncio.run(scenario())
    result["continuous"] = {"idle_s": round(idle, 3), "after_abandoned_s": round(after, 3), "ratio": round(after / idle, 2)}
    log(f"short request after {streams} abandoned streams (continuous): {after:.3f} s vs {idle:.3f} s idle")
    result["after_abandoned_static_vs_continuous"] = round(result["static"]["after_abandoned_s"]
                                                           / result["continuous"]["after_abandoned_s"], 2)
    return result


def measure(model_path: str, rows: int = 24, batch_size: int = 4, fixed_tokens: int = 32, repeats: int = 1, log=print) -> dict:
    return {"batch": measure_batch(model_path, rows, batch_size, fixed_tokens, repeats, log=log),
            "abandoned": measure_abandoned(model_path, log=log)}


if __name__ == "__main__":
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(description="continuous vs static batching (JSON to stdout or --out)")
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, interleaved; the best of each is kept")
    p.add_argument("--out")
    a = p.parse_args()
    r = measure(a.model, rows=a.rows, repeats=a.repeats)
    r["command"] = "python -m benchmarks.continuous " + " ".join(sys.argv[1:])
    text = json.dumps(r, indent=1)
    if a.out:
        open(a.out, "w").write(text + "\n")
    print(text)
