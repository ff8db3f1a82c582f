"""Tensor parallelism: one model replica across `tp` devices of one node, one process per rank.

The actor that holds a replica's devices (the Generate actor reserves `tp` GPUs, or `tp` CPUs)
starts `tp` rank processes (`python -m pipeline.model.tensor_parallel`). Each joins a torch.distributed
group (NCCL on GPUs, gloo on CPU; rendezvous on 127.0.0.1) and loads the model with transformers'
`tp_plan="auto"`: the language model's layers and head are split across the ranks, the vision tower
is replicated. Every batch goes to every rank, the ranks generate in lockstep (their collectives
keep them together) and rank 0's result is returned.

A rank that dies, or a replica that overruns `replica_timeout_s`, takes the whole replica down:
every rank is killed (the others would wait in a collective for ever), a new replica is started
and the batch is retried, `replica_restarts` times; then ReplicaFailed is raised. Nothing waits
without a deadline, and ranks exit when their parent does.
Messages: pipeline/io/child_process.py, on each rank's stdin/stdout.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from pipeline import metrics
from pipeline.config import ModelSettings
from pipeline.io.child_process import Child, channel, exit_with_parent, receive, receive_any, send, stop_all
from pipeline.model.failures import ReplicaFailed, free_cache, is_out_of_memory

log = logging.getLogger("pipeline.model.tensor_parallel")

DEFAULT_RANK_MODULE = "pipeline.model.tensor_parallel"
# Test-only: a module run (python -m) as each rank instead, e.g. tests.helpers.fault_rank, which
# kills or hangs a rank. Read here only; not a user option.
TEST_RANK_MODULE_ENV = "PIPELINE_TEST_RANK_MODULE"
# After one rank reports an error, how long the others may take to report theirs; a rank still
# silent then is stuck in a collective and the replica is out of step.
DESYNC_GRACE_S = 30.0
# Loading may take far longer than a batch (72B from disk); a rank that dies while loading is
# still noticed at once, this only bounds a load that hangs.
LOAD_TIMEOUT_S = 3600.0
# A rank whose stdout closed is dying: how long its own end (the signal to report) is waited for.
EXIT_GRACE_S = 5.0


class _ReplicaDown(Exception):
    """A rank died, hung or could not start: the replica must be restarted."""


def make_engine(settings: ModelSettings, model_path: str, device: str):
    """The engine for one replica: in this process for tp=1, else across tp rank processes."""
    if settings.tp == 1:
        from pipeline.model.engine import Engine

        return Engine(model_path, device=device, dtype=settings.dtype, attn_implementation=settings.attn_implementation,
                      **settings.load_options())
    return TensorParallelEngine(model_path, device=device, dtype=settings.dtype,
                                attn_implementation=settings.attn_implementation, tp=settings.tp,
                                load_options=settings.load_options(),
                                timeout_s=settings.replica_timeout_s, restarts=settings.replica_restarts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Rank(Child):
    """One rank process (`python -m rank_module`)."""

    def __init__(self, rank: int, module: str, env: dict):
        super().__init__(module, dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
        self.rank = rank

    def died(self) -> str:
        return f"rank {self.rank} died ({self.ended()})"


class TensorParallelEngine:
    """The Engine interface (generate) over `tp` rank processes."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa",
                 tp: int = 2, timeout_s: float = 600.0, restarts: int = 2,
                 rank_module: str | None = None, load_options: dict | None = None):
        # the ranks' own collective timeout only backs up this process's deadlines
        self.spec = dict(model_path=model_path, device=device, dtype=dtype, attn_implementation=attn_implementation,
                         timeout_s=max(timeout_s, LOAD_TIMEOUT_S), load_options=load_options or {})
        self.tp, self.timeout_s, self.restarts = tp, timeout_s, restarts
        self.rank_module = rank_module or os.environ.get(TEST_RANK_MODULE_ENV) or DEFAULT_RANK_MODULE
        # the ranks' engines schedule rows continuously (rank 0's tokens, broadcast each step)
        self.continuous = (load_options or {}).get("scheduling", "continuous") == "continuous"
        self.ranks: list[_Rank] | None = None
        self.starts = 0  # replicas started so far (1 + restarts)
        self._lock = threading.Lock()  # one batch at a time: every rank must see the same sequence
        with self._lock:
            self._attempts(lambda: None, "loading the model")

    def generate(self, inputs, gen, seeds=None):
        with self._lock:
            replies = self._attempts(lambda: self._exchange(("generate", inputs, gen, seeds)), "this batch")
        errors = [r for r in replies if r[0] == "error"]
        if errors:
            kind, message = errors[0][1:]
            if kind == "out_of_memory":
                import torch

                raise torch.OutOfMemoryError(message)
            raise RuntimeError(message)
        return replies[0][1]

    def close(self) -> None:
        self._stop()

    def __del__(self):
        self._stop()

    # --- the replica's life ---------------------------------------------------------------------

    def _attempts(self, call, what: str):
        """call() on a running replica; a replica that goes down is restarted and call() retried."""
        failures = []
        for _ in range(self.restarts + 1):
            try:
                if self.ranks is None:
                    self._start()
                return call()
            except _ReplicaDown as e:
                self._stop()
                failures.append(str(e))
                metrics.replica_failed(restarting=len(failures) <= self.restarts)
                log.warning("tensor-parallel replica (tp=%d) went down on %s: %s; %s", self.tp, what, e,
                            "restarting it" if len(failures) <= self.restarts else "giving up")
        raise ReplicaFailed(f"the tensor-parallel replica (tp={self.tp}) went down {len(failures)} times on {what} "
                            f"(restarted each time): {'; '.join(failures)}")

    def _start(self) -> None:
        port = _free_port()
        base = dict(WORLD_SIZE=str(self.tp), LOCAL_WORLD_SIZE=str(self.tp), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port))
        if self.spec["device"] == "cpu":
            base["CUDA_VISIBLE_DEVICES"] = ""  # transformers picks the mesh's device type from what it sees
            # the replica's CPUs (Ray sets OMP_NUM_THREADS to them) shared among its ranks
            threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
            base["OMP_NUM_THREADS"] = str(max(1, threads // self.tp))
        self.starts += 1
        self.ranks = [_Rank(i, self.rank_module, base) for i in range(self.tp)]
        replies = self._exchange(("load", self.spec))
        if errors := [r for r in replies if r[0] == "error"]:
            raise _ReplicaDown(f"loading failed: {errors[0][2]}")
        log.info("tensor-parallel replica up: %d ranks (start %d)", self.tp, self.starts)

    def _stop(self) -> None:
        ranks, self.ranks = getattr(self, "ranks", None), None
        stop_all(ranks or [])

    def _exchange(self, message) -> list:
        """Send message to every rank and return every rank's reply (in rank order)."""
        timeout_s = max(self.timeout_s, LOAD_TIMEOUT_S) if message[0] == "load" else self.timeout_s
        deadline = time.monotonic() + timeout_s
        for r in self.ranks:
            try:
                r.send(message)
            except OSError:  # BrokenPipeError: the rank is gone
                raise _ReplicaDown(r.died()) from None
        replies: dict[int, tuple] = {}
        while len(replies) < len(self.ranks):
            waiting = [r for r in self.ranks if r.rank not in replies]
            try:
                r, reply = receive_any(waiting, deadline)
            except TimeoutError:
                if any(reply[0] == "error" for reply in replies.values()):
                    # a rank failed (e.g. out of memory) and left the others in a collective: the
                    # replica is out of step; restart it for the next batch and report this error
                    self._stop()
                    return list(replies.values())
                raise _ReplicaDown(f"ranks {[r.rank for r in waiting]} did not answer within {timeout_s:g} s") from None
            if reply is None:  # its stdout closed: the rank is dying
                r.wait_exit(EXIT_GRACE_S)
                raise _ReplicaDown(r.died())
            replies[r.rank] = reply
            if reply[0] == "error":
                deadline = min(deadline, time.monotonic() + DESYNC_GRACE_S)
        return [replies[i] for i in range(len(self.ranks))]


# --- the rank process ---------------------------------------------------------------------------

def load_rank(spec: dict):
    """Join the replica's process group and load this rank's part of the model."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from pipeline.model.engine import Engine

    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=spec["timeout_s"]),
                            device_id=torch.device("cuda", local_rank) if device == "cuda" else None)
    return Engine(spec["model_path"], device=device, dtype=spec["dtype"],
                  attn_implementation=spec["attn_implementation"], tp=world, **spec.get("load_options", {}))


def serve_rank(generate=lambda engine, *args: engine.generate(*args)) -> None:
    """A rank's loop: load, then one generate per message, until stdin closes."""
    requests, replies = channel()
    exit_with_parent()
    rank = int(os.environ["RANK"])
    engine = None
    while (message := receive(requests)) is not None:
        op, *args = message
        try:
            if op == "load":
                engine, result = load_rank(*args), None
            else:
                result = generate(engine, *args)
            send(replies, ("ok", result if rank == 0 else None))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
            kind = "out_of_memory" if is_out_of_memory(e) else "error"
            if kind == "out_of_memory":
                free_cache()
            send(replies, ("error", kind, f"{type(e).__name__}: {e}"))


if __name__ == "__main__":
    serve_rank()
