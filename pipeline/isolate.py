"""Generate for a batch so that a failure costs as few rows as possible.

- Out of memory (CUDA, or the CPU allocator): the batch is split in halves and each half retried,
  recursively; only a single row that still runs out of memory becomes an `out_of_memory` row.
- Any other error: the rows are retried one by one; those that fail alone become `model_error` rows.
- A tensor-parallel replica that went down on every restart (ReplicaFailed): the batch's rows
  become `model_error` rows (the retries have already been spent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.config import GenerationConfig

log = logging.getLogger("pipeline.isolate")


@dataclass
class RowError:
    error_type: str  # out_of_memory | model_error
    message: str


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def generate_rows(engine, inputs: list, gen: GenerationConfig, seeds: list[int]) -> list:
    """engine.generate(inputs, gen, seeds), with each row's result or its RowError, in input order."""
    from pipeline.tensor_parallel import ReplicaFailed

    try:
        return engine.generate(inputs, gen, seeds)
    except ReplicaFailed as e:
        return [RowError("model_error", str(e))] * len(inputs)
    except Exception as e:  # noqa: BLE001 - classified below; each row gets its own outcome
        if is_out_of_memory(e):
            _free_cache()
            if len(inputs) == 1:
                return [RowError("out_of_memory", f"generation ran out of memory on this row alone "
                                                  f"({len(inputs[0]['input_ids'])} prompt tokens): use fewer frames, "
                                                  f"a smaller max_pixels or a larger --tp: {type(e).__name__}: {e}")]
            half = len(inputs) // 2
            log.warning("out of memory on a batch of %d rows; retrying it as %d + %d rows", len(inputs), half,
                        len(inputs) - half)
            return (generate_rows(engine, inputs[:half], gen, seeds[:half])
                    + generate_rows(engine, inputs[half:], gen, seeds[half:]))
        if len(inputs) == 1:
            return [RowError("model_error", f"generation failed: {type(e).__name__}: {e}")]
        return [r for x, s in zip(inputs, seeds) for r in generate_rows(engine, [x], gen, [s])]


def _free_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
