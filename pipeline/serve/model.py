"""LlavaModel: the model deployment. One Engine; each request streams its own text as it is generated.

Continuous scheduling (the default, one process per replica): a scheduler thread steps the
engine's continuous batch (pipeline/model/continuous.py); a request joins the running rows at the
next step (no batch wait), its tokens go to its RowStream as each step runs, and it leaves at its
end, its stop string, or within one step of its client going away (the request's generator is
cancelled: its row is marked cancelled and dropped at the next step, with its cache). A step that
fails (out of memory, a row the model rejects) hands the rows it held to generate_rows, which
splits and isolates as in the batch job; the others then go on.
Static scheduling, or a tensor-parallel replica: `@serve.batch` collects concurrent requests into
one generate call.

The engine runs in a worker thread (the replica keeps accepting the next batch meanwhile) with a
transformers streamer that gets one token per row per step; each row's RowStream turns its tokens
into text deltas, applies the request's stop strings and knows when the row is done (end token,
stop string, token budget). The batched generator hands Serve one list of events per request and
round. Events: {"text": delta} while generating; the last one adds finish_reason, usage and
batch_size; a failed row sends {"error": message}.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from ray import serve

from pipeline import metrics
from pipeline.config import GenerationConfig
from pipeline.serve.protocol import usage

log = logging.getLogger("pipeline.serve.model")


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
        self.scheduler = None
        if self.streams and self.engine.continuous:
            self.scheduler = self.engine.scheduler(max_rows=cfg.batch_size)
            self._wake = threading.Event()
            threading.Thread(target=self._schedule, name="continuous-batching", daemon=True).start()

    async def ping(self) -> str:
        return "ok"

    async def generate(self, job: Job):
        """Lists of events for this request (see the module's docstring), as they come."""
        job.enqueued = time.monotonic()
        if self.scheduler is not None:
            async for events in self._generate_continuous(job):
                yield events
            return
        async for events in self.generate_batch(job):
            if events:
                yield events

    # --- continuous scheduling ----------------------------------------------------------------------

    async def _generate_continuous(self, job: Job):
        from pipeline.model.continuous import Row

        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        stream = RowStream(job, self.engine.tokenizer, self.engine.eos_ids, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e), 1)
        row = Row(job.inputs, job.generation, job.seed, on_token=lambda step, t: self._token(row, stream, step, t))
        row.stream = stream
        self.scheduler.submit(row)
        self._wake.set()
        try:
            while True:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                yield events
                if any("finish_reason" in e or "error" in e for e in events):
                    return
        finally:
            row.cancelled = True  # a client gone (this generator cancelled): the row leaves at the next step

    def _token(self, row, stream: RowStream, step: int, token: int) -> bool:
        """A row's new token (the scheduler's thread): to its stream; True ends the row (its stream is done)."""
        if step == 0:
            stream.batch_size = len(self.scheduler.running)
            metrics.serve_batch(stream.batch_size, [time.monotonic() - stream.job.enqueued])
        stream.token(step, token)
        return stream.done

    def _schedule(self) -> None:
        """The scheduler's thread: step while rows run or wait; sleep until a request arrives."""
        while True:
            if self.scheduler.idle:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                try:
                    left = self.scheduler.step()
                except Exception:  # noqa: BLE001 - the rows it held are retried, each to its own outcome
                    log.warning("a continuous-batching step failed; retrying its %d rows", len(self.scheduler.dropped),
                                exc_info=True)
                    self._retry(self.scheduler.dropped)
                    continue
                for row in left:
                    row.stream.finish(row.result)
            except Exception:  # noqa: BLE001 - the thread must outlive any one request
                log.exception("continuous batching: a request failed outside the model")

    def _retry(self, rows: list) -> None:
        """Rows of a failed step: generate_rows splits after out of memory and isolates a bad row; each
        stream skips the tokens it has sent and ends from its row's result."""
        from pipeline.model.batching import generate_rows

        groups: dict[str, list] = {}
        for row in rows:
            if not row.cancelled:
                groups.setdefault(row.gen.model_dump_json(), []).append(row)
        for same in groups.values():
            for row, result in zip(same, generate_rows(self.engine, [r.inputs for r in same], same[0].gen, [r.seed for r in same])):
                row.stream.finish(result)

    # --- static scheduling -------------------------------------------------------------------------

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
