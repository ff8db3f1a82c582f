"""LlavaModel: the model deployment. One Engine; `@serve.batch` collects concurrent requests into
one generate call and streams each request its own text as it is generated.

The engine runs in a worker thread (the replica keeps accepting the next batch meanwhile) with a
transformers streamer that gets one token per row per step; each row's RowStream turns its tokens
into text deltas, applies the request's stop strings and knows when the row is done (end token,
stop string, token budget). The batched generator hands Serve one list of events per request and
round. Events: {"text": delta} while generating; the last one adds finish_reason, usage and
batch_size; a failed row sends {"error": message}.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from ray import serve

from pipeline import metrics
from pipeline.config import GenerationConfig
from pipeline.serve.protocol import usage


@dataclass
class Job:
    inputs: dict[str, np.ndarray]
    generation: GenerationConfig
    seed: int
    stop: list[str] = field(default_factory=list)
    stream: bool = True  # False: the text comes whole in the last event (one message, not one per token)
    enqueued: float = 0.0  # monotonic, set by the replica when the request arrives


class RowStream:
    """One request's text while its row generates (called from the engine's thread via `emit`)."""

    def __init__(self, job: Job, tokenizer, eos_ids: set[int], emit, batch_size: int):
        self.job, self.tokenizer, self.eos_ids, self.emit, self.batch_size = job, tokenizer, eos_ids, emit, batch_size
        self.tokens: list[int] = []
        self.sent = ""  # text already emitted
        self.done = False
        # a stop string may be split over tokens: hold back what could be its start
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def token(self, step: int, token: int) -> None:
        # a batch retried after out of memory replays the same tokens from step 0: skip those seen
        if self.done or step != len(self.tokens):
            return
        if token in self.eos_ids:
            self._end(self._decode(), "stop", len(self.tokens) + 1)  # the engine counts the end token
            return
        self.tokens.append(token)
        text = self._decode()
        if self._stopped(text):
            return
        if len(self.tokens) >= self.job.generation.max_new_tokens:
            self._end(text, "length", len(self.tokens))
            return
        if not self.job.stream:
            return
        safe = text.rstrip("\ufffd")  # an unfinished UTF-8 character
        safe = safe[: len(safe) - self.hold] if self.hold else safe
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self.emit({"text": safe[len(self.sent):]})
            self.sent = safe

    def finish(self, result) -> None:
        """The engine call returned: end the row from its result if the streamer did not (no
        streaming engine, or a failed row)."""
        from pipeline.model.batching import RowError

        if self.done:
            return
        if isinstance(result, RowError):
            self.done = True
            self.emit({"error": result.message, "error_type": result.error_type})
            return
        if not self._stopped(result.text):  # the engine's own finish reason (EOS seen: stop; else length)
            self._end(result.text, result.finish_reason, result.output_tokens)

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _stopped(self, text: str) -> bool:
        cuts = [i for i in (text.find(s) for s in self.job.stop) if i >= 0]
        if cuts:
            self._end(text[: min(cuts)], "stop", len(self.tokens))
        return bool(cuts)

    def _end(self, text: str, finish_reason: str, completion_tokens: int) -> None:
        self.done = True
        delta = text[len(self.sent):] if text.startswith(self.sent) else text
        prompt_tokens = len(self.job.inputs["input_ids"])
        self.emit({"text": delta, "finish_reason": finish_reason, "batch_size": self.batch_size,
                   "usage": usage(prompt_tokens, completion_tokens)})


class _RowsStreamer:
    """transformers' streamer interface (put/end) for one generate call: the prompt ids first, then
    each step's token of every row, handed to the rows' RowStreams."""

    def __init__(self, rows: list[RowStream]):
        self.rows, self.step, self.prompt_seen = rows, 0, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            row.token(self.step, token)
        self.step += 1

    def end(self) -> None:
        pass


class _StreamingEngine:
    """What generate_rows calls: the engine, with a streamer for the rows of each call (it splits
    batches by prompt length and after out of memory; inputs are matched to rows by identity)."""

    def __init__(self, engine, rows_by_input: dict[int, RowStream]):
        self.engine, self.rows_by_input = engine, rows_by_input

    def generate(self, inputs, gen, seeds):
        streamer = _RowsStreamer([self.rows_by_input[id(x)] for x in inputs])
        return self.engine.generate(inputs, gen, seeds, streamer=streamer)


@serve.deployment(name="LlavaModel")
class LlavaModel:
    def __init__(self, cfg):
        from pipeline.model.checkpoint import local_checkpoint
        from pipeline.model.engine import Engine
        from pipeline.model.tensor_parallel import make_engine

        self.engine = make_engine(cfg, local_checkpoint(cfg.model, cfg.storage), cfg.device)
        # a tensor-parallel replica generates in its rank processes: its rows arrive whole at the end
        self.streams = isinstance(self.engine, Engine)
        self.generate_batch.set_max_batch_size(cfg.batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    async def ping(self) -> str:
        return "ok"

    async def generate(self, job: Job):
        """Lists of events for this request (see the module's docstring), as they come."""
        job.enqueued = time.monotonic()
        async for events in self.generate_batch(job):
            if events:
                yield events

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)  # replaced from the config in __init__
    async def generate_batch(self, jobs: list[Job]):
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        metrics.serve_batch(len(jobs), [time.monotonic() - j.enqueued for j in jobs])
        tokenizer, eos_ids = self._tokenizer()
        rows = [RowStream(job, tokenizer, eos_ids, self._emitter(loop, queue, i), len(jobs))
                for i, job in enumerate(jobs)]
        work = asyncio.ensure_future(asyncio.to_thread(self._generate, jobs, rows))
        ended = [False] * len(jobs)
        while True:
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, work}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                if queue.empty():  # the thread's events are all queued before its result
                    break
                continue
            events = [get.result()]
            while not queue.empty():
                events.append(queue.get_nowait())
            out: list = [StopIteration if ended[i] else [] for i in range(len(jobs))]
            for i, event in events:
                out[i].append(event)
            for i, event in events:
                ended[i] = ended[i] or "finish_reason" in event or "error" in event
            yield out
        work.result()  # an unexpected failure fails the batch's requests

    @staticmethod
    def _emitter(loop, queue: asyncio.Queue, i: int):
        return lambda event: loop.call_soon_threadsafe(queue.put_nowait, (i, event))

    def _tokenizer(self):
        from pipeline.model.engine import Engine

        if isinstance(self.engine, Engine):
            return self.engine.tokenizer, self.engine.eos_ids
        return None, set()  # rows end from the engine's results (RowStream.finish)

    def _generate(self, jobs: list[Job], rows: list[RowStream]) -> None:
        from pipeline.model.batching import generate_rows

        groups: dict[str, list[int]] = {}  # one generate call per distinct generation setting
        for i, job in enumerate(jobs):
            groups.setdefault(job.generation.model_dump_json(), []).append(i)
        for idx in groups.values():
            engine = (_StreamingEngine(self.engine, {id(jobs[i].inputs): rows[i] for i in idx})
                      if self.streams else self.engine)
            # out of memory: split and retried; other failures: isolated to the failing request(s)
            results = generate_rows(engine, [jobs[i].inputs for i in idx], jobs[idx[0]].generation,
                                    [jobs[i].seed for i in idx])
            for i, result in zip(idx, results):
                rows[i].finish(result)
