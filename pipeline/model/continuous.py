"""Continuous batching: rows join and leave the running batch between decode steps.

One Scheduler per replica holds the running rows and one transformers `DynamicCache` for all of
them (left padded: each row's tokens are the rightmost columns of the cache and of the attention
mask). A step:

1. rows whose caller cancelled them (a client that left) leave: their cache rows are dropped at
   once (`DynamicCache.batch_select_indices`) and leading columns no row uses are cut away;
2. waiting rows join, first come first served, while the running rows' padded cache stays within
   the token budget (rows x the longest row's prompt + max_new_tokens) and the slots (`max_rows`);
   their prefill is the model's own forward pass on their token ids, left padded within groups of
   similar length (pipeline.model.batching.length_groups), with the media features of
   pipeline.model.vision (computed once per distinct media) as `mm_encoder_outputs`, into a cache
   of their own, which is then padded and concatenated with the running cache;
3. one decode forward for every running row (its last token, its own position, the mask);
4. each row picks its token from its own logits (greedy, or its own seeded generator: the
   semantics of engine.PerRowSampler) and leaves at EOS ("stop"), its own max_new_tokens
   ("length"), a stop string ("stop") or when its caller says so.

So every row sees what transformers' generate gives it alone: the same prompt positions
(cumsum of the mask, as generate computes them), the same masked attention, the same logits.
transformers' own continuous batching (generate_batch / ContinuousBatchingManager) takes token ids
only and cannot take a LLaVA prompt's media features, hence this prefill path of our own.

Under tensor parallelism every rank runs the same Scheduler on the same rows; the tokens of each
step are broadcast from rank 0, so every rank takes rank 0's decisions (rank 0 schedules).
A failure in a step (out of memory, a row the model rejects) drops every row of the scheduler
(their caches freed) and raises; the caller decides (pipeline.model.batching splits and retries).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline.config import GenerationConfig

# CPU replicas (no sizing plan): tokens (prompt + new, padded) the running rows may hold.
DEFAULT_TOKEN_BUDGET = 65_536


@dataclass
class Row:
    """One (prompt, media) row in the scheduler."""

    inputs: dict[str, np.ndarray]
    gen: GenerationConfig
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    # called after each new token with (step, token); returning True ends the row there (its caller's
    # own stop rule); called from the scheduler's thread
    on_token: Callable[[int, int], bool | None] | None = None
    cancelled: bool = False  # set from any thread: the row leaves at the next step
    # outcome (set when the row leaves)
    result: object = None
    done: threading.Event = field(default_factory=threading.Event)
    # state while running
    tokens: list[int] = field(default_factory=list)
    joined_step: int | None = None  # the scheduler step at which its prefill ran

    @property
    def prompt_tokens(self) -> int:
        return len(self.inputs["input_ids"])

    @property
    def cost(self) -> int:
        """Cache columns this row may reach: its prompt and its whole answer."""
        return self.prompt_tokens + self.gen.max_new_tokens


class Scheduler:
    """Step-level scheduling of rows over one engine's model (see the module's docstring)."""

    def __init__(self, engine, token_budget: int | None = None, max_rows: int | None = None):
        self.engine = engine
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET
        self.max_rows = max_rows
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self._lock = threading.Lock()  # guards `waiting` (submit from other threads)
        self._cache = None  # DynamicCache of the running rows, or None
        self._mask = None  # (rows, columns) long
        self._pending = None  # (rows,) the last token of each running row, not yet in the cache
        self._samplers: dict[int, object] = {}  # id(row) -> RowSampler
        self.dropped: list[Row] = []
        self.steps = 0
        self.peak_columns = 0  # the widest padded cache seen (rows x columns), for tests and benchmarks

    # --- callers ----------------------------------------------------------------------------------

    def submit(self, row: Row) -> Row:
        with self._lock:
            self.waiting.append(row)
        return row

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def run(self, rows: list[Row]) -> list:
        """Submit rows and step until every one has left; their results, in order."""
        for r in rows:
            self.submit(r)
        while not all(r.done.is_set() for r in rows):
            self.step()
        return [r.result for r in rows]

    # --- one step ---------------------------------------------------------------------------------

    def step(self) -> list[Row]:
        """Cancelled rows leave, waiting rows join (prefill), one decode step; the rows that left."""
        try:
            return self._step()
        except BaseException:
            self.dropped = self.reset()  # the rows it held, for the caller to retry or fail
            raise

    def reset(self) -> list[Row]:
        """Drop every row (running and waiting) and free the cache; the rows dropped (not done)."""
        with self._lock:
            dropped = self.running + list(self.waiting)
            self.waiting.clear()
        self.running, self._cache, self._mask, self._pending = [], None, None, None
        self._samplers.clear()
        for r in dropped:
            r.tokens = []
        return dropped

    def _step(self) -> list[Row]:
        import torch

        left = [r for r in self.running if r.cancelled]
        self._leave([r for r in self.running if not r.cancelled], left, "cancelled")
        with torch.inference_mode():
            joined = self._admit(left)
            left += self._prefill(joined)
            if self.running:
                left += self._decode()
        self.steps += 1
        return left

    def _admit(self, left: list[Row]) -> list[Row]:
        """Waiting rows that fit join (rows cancelled while waiting leave, into `left`)."""
        joined: list[Row] = []
        with self._lock:
            while self.waiting:
                row = self.waiting[0]
                if row.cancelled:
                    self.waiting.popleft()
                    self._finish(row, "cancelled")
                    left.append(row)
                    continue
                rows = len(self.running) + len(joined)
                if rows and self.max_rows and rows >= self.max_rows:
                    break
                widest = max([r.cost for r in self.running + joined] + [row.cost])
                if rows and (rows + 1) * widest > self.token_budget:
                    break  # full: the row waits for running rows to leave
                joined.append(self.waiting.popleft())
        return joined

    def _prefill(self, joined: list[Row]) -> list[Row]:
        """The joining rows' prompts through the model, in groups of similar length; their first
        tokens; their caches joined to the running cache."""
        from transformers import DynamicCache

        from pipeline.model.batching import MIN_BATCH_FILL, length_groups

        eng = self.engine
        left = []
        for group in length_groups([r.prompt_tokens for r in joined], MIN_BATCH_FILL):
            rows = [joined[i] for i in group]
            for r in rows:
                self._samplers[id(r)] = eng.row_sampler(r.gen, r.seed)
                r.joined_step = self.steps
            batch = eng.collate([r.inputs for r in rows])
            mask = batch["attention_mask"]
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate computes them
            cache = DynamicCache(config=eng.model.config)
            out = eng.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1, mm_encoder_outputs=eng.vision.encoder_outputs([r.inputs for r in rows]))
            tokens = self._choose(rows, out.logits[:, -1, :])
            self._join(rows, out.cache, mask, tokens)
            left += self._after_tokens(rows, tokens)
        return left

    def _decode(self) -> list[Row]:
        import torch

        eng = self.engine
        ones = torch.ones((len(self.running), 1), dtype=self._mask.dtype, device=self._mask.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        positions = self._positions()
        out = eng.model(input_ids=self._pending[:, None], attention_mask=self._mask, position_ids=positions,
                        cache=self._cache, use_cache=True, logits_to_keep=1)
        self._cache = out.cache
        tokens = self._choose(self.running, out.logits[:, -1, :])
        return self._after_tokens(list(self.running), tokens)

    def _positions(self):
        """Each running row's position for its next token: its own length, whatever the padding."""
        return self._mask.sum(-1, keepdim=True) - 1

    # --- tokens -----------------------------------------------------------------------------------

    def _choose(self, rows: list[Row], logits):
        """Each row's next token from its own logits (float32, as generate takes them)."""
        import torch

        logits = logits.float()
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for i, r in enumerate(rows):
            tokens[i] = self._samplers[id(r)](r, logits[i])
        _broadcast_from_rank0(tokens)
        return tokens

    def _after_tokens(self, rows: list[Row], tokens) -> list[Row]:
        """Record each row's new token; rows that reached their end leave."""
        eng = self.engine
        index = {id(r): i for i, r in enumerate(self.running)}
        for r, t in zip(rows, tokens.tolist()):
            self._pending[index[id(r)]] = t
        ended: list[tuple[Row, str]] = []
        for r, t in zip(rows, tokens.tolist()):
            step = len(r.tokens)
            r.tokens.append(t)
            stopped = bool(r.on_token(step, t)) if r.on_token is not None else False
            if t in eng.eos_ids:
                ended.append((r, "stop"))
            elif stopped or r.cancelled:
                ended.append((r, "cancelled" if r.cancelled else "stop"))
            elif r.stop and any(s in eng.tokenizer.decode(r.tokens, skip_special_tokens=True) for s in r.stop):
                ended.append((r, "stop"))
            elif len(r.tokens) >= r.gen.max_new_tokens:
                ended.append((r, "length"))
        if ended:
            gone = {id(r) for r, _ in ended}
            self._leave([r for r in self.running if id(r) not in gone], [r for r, _ in ended], None)
            for r, reason in ended:
                self._finish(r, reason)
        return [r for r, _ in ended]

    def _finish(self, row: Row, reason: str) -> None:
        from pipeline.model.generated import Generated

        eng = self.engine
        text = eng.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in row.stop) if i >= 0]
        if cuts:
            text = text[:min(cuts)]
        ids = list(row.tokens[:-1] if row.tokens and row.tokens[-1] in eng.eos_ids else row.tokens)  # EOS excluded
        row.result = Generated(text=text, prompt_tokens=row.prompt_tokens, output_tokens=len(row.tokens),
                               finish_reason=reason, token_ids=ids)
        self._samplers.pop(id(row), None)
        row.done.set()

    # --- the cache ----------------------------------------------------------------------------------

    def _join(self, rows: list[Row], cache, mask, tokens) -> None:
        """Append rows (their own prefilled cache and mask) to the running batch, left padded to a common width."""
        import torch
        import torch.nn.functional as F

        if self._cache is None:
            self._cache, self._mask, self._pending = cache, mask, tokens.clone()
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            pad_old, pad_new = width - self._mask.shape[1], width - mask.shape[1]
            for old, new in zip(self._cache.layers, cache.layers):
                old.keys = torch.cat([F.pad(old.keys, (0, 0, pad_old, 0)), F.pad(new.keys, (0, 0, pad_new, 0))])
                old.values = torch.cat([F.pad(old.values, (0, 0, pad_old, 0)), F.pad(new.values, (0, 0, pad_new, 0))])
            self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
            self._pending = torch.cat([self._pending, tokens])
        self.running += rows
        self.peak_columns = max(self.peak_columns, self._mask.numel())

    def _leave(self, keep: list[Row], leaving: list[Row], reason: str | None) -> None:
        """Rows leave the batch: their cache rows are dropped now, and the columns no row uses any more."""
        import torch

        if not leaving:
            return
        if not keep:
            self.running, self._cache, self._mask, self._pending = [], None, None, None
        else:
            position = {id(r): i for i, r in enumerate(self.running)}
            idx = torch.tensor([position[id(r)] for r in keep], device=self._mask.device)
            self._cache.batch_select_indices(idx)  # transformers' own: keeps these batch rows
            self._mask, self._pending = self._mask[idx], self._pending[idx]
            first = int(self._mask.any(0).long().argmax())  # rows are right aligned: leading columns may be free
            if first:
                for layer in self._cache.layers:
                    layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
                self._mask = self._mask[:, first:]
            self.running = keep
        if reason is not None:
            for r in leaving:
                self._finish(r, reason)


def _broadcast_from_rank0(tokens) -> None:
    """Under tensor parallelism every rank takes rank 0's tokens, so all ranks run the same steps."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tokens, src=0)


def check_cache_layers(model) -> None:
    """This scheduler pads and cuts cache columns: only for models whose every layer keeps all its
    columns (no sliding-window layers)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise NotImplementedError("continuous batching needs full-attention cache layers (this model has sliding-window layers)")
