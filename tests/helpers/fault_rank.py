"""A tensor-parallel rank that injects real faults: PIPELINE_TEST_RANK_MODULE=tests.helpers.fault_rank
(or TensorParallelEngine(rank_module="tests.helpers.fault_rank")).

The fault is chosen by the file `fault-mode` beside the model folder (the test writes it):
  kill-once    rank 1 kills itself (SIGKILL) inside the forward pass of the run's first batch,
               while rank 0 waits for it in a collective
  kill-always  the same in every batch
  hang-once    rank 1 hangs inside the forward pass of the run's first batch
  oom-over-N   rank 1 raises torch.OutOfMemoryError on batches of more than N rows, before the
               forward pass, so rank 0 is left waiting in a collective
Each fault is appended to `fault-log` there, for the test to read.
"""

import os
import signal
import time
from pathlib import Path

from pipeline.model.tensor_parallel import serve_rank


def faulty_generate(engine, inputs, gen, seeds):
    state = Path(engine.model.name_or_path).parent
    mode = (state / "fault-mode").read_text().strip() if (state / "fault-mode").exists() else ""
    fired = state / "fault-fired"
    if (os.environ["RANK"] != "1" or not mode or (mode.endswith("-once") and fired.exists())
            or (mode.startswith("oom-over-") and len(inputs) <= int(mode.rsplit("-", 1)[1]))):
        return engine.generate(inputs, gen, seeds)
    fired.touch()
    with open(state / "fault-log", "a") as log:
        log.write(f"{mode} pid={os.getpid()} rows={len(inputs)}\n")
    if mode.startswith("oom-over-"):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory (injected by tests.helpers.fault_rank)")
    last_layer = [m for m in engine.model.modules() if type(m).__name__.endswith("DecoderLayer")][-1]

    def fault(*_):
        if mode.startswith("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)

    last_layer.register_forward_pre_hook(fault)  # this rank's replica is replaced after it anyway
    return engine.generate(inputs, gen, seeds)


if __name__ == "__main__":
    serve_rank(faulty_generate)
