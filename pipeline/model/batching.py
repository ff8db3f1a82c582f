"""Generate for a batch so that padding and failures cost as few rows as possible.

- Rows are grouped by prompt length first (one generate call per group): left padding makes every
  row of a call as long as its longest, and an image with anyres patches (~7,000 tokens) in a
  batch of videos (~1,600) made the call ~4x the work of the rows on their own. A continuous
  engine (pipeline/model/continuous.py) gets the rows in one call: it groups each step's prefill
  by length itself, and rows of every length then join as others end.
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
from pipeline.model.failures import ReplicaFailed, free_cache, is_out_of_memory

log = logging.getLogger("pipeline.model.batching")


@dataclass
class RowError:
    error_type: str  # out_of_memory | model_error
    message: str


# A call's real tokens must be at least this share of its padded tokens (rows x longest row).
MIN_BATCH_FILL = 0.5


def length_groups(lengths: list[int], min_fill: float) -> list[list[int]]:
    """Row indices in groups of similar length: shortest first; a row starts a new group when
    adding it would leave less than min_fill of the group's padded tokens real."""
    groups, total = [], 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (total + lengths[i]) < min_fill * (len(groups[-1]) + 1) * lengths[i]:
            groups.append([])
            total = 0
        if not groups:
            groups.append([])
        groups[-1].append(i)
        total += lengths[i]
    return groups


def generate_rows(engine, inputs: list, gen: GenerationConfig, seeds: list[int]) -> list:
    """engine.generate(inputs, gen, seeds), with each row's result or its RowError, in input order;
    one call per group of similar prompt length."""
    results = [None] * len(inputs)
    groups = ([list(range(len(inputs)))] if getattr(engine, "continuous", False)
              else length_groups([len(x["input_ids"]) for x in inputs], MIN_BATCH_FILL))
    for group in groups:
        for i, result in zip(group, _generate_isolated(engine, [inputs[i] for i in group], gen, [seeds[i] for i in group])):
            results[i] = result
    return results


def _generate_isolated(engine, inputs: list, gen: GenerationConfig, seeds: list[int]) -> list:
    try:
        return engine.generate(inputs, gen, seeds)
    except ReplicaFailed as e:
        return [RowError("model_error", str(e))] * len(inputs)
    except Exception as e:  # noqa: BLE001 - classified below; each row gets its own outcome
        if is_out_of_memory(e):
            free_cache()
            if len(inputs) == 1:
                return [RowError("out_of_memory", f"generation ran out of memory on this row alone "
                                                  f"({len(inputs[0]['input_ids'])} prompt tokens): use fewer frames, "
                                                  f"a smaller max_pixels or a larger --tp: {type(e).__name__}: {e}")]
            half = len(inputs) // 2
            log.warning("out of memory on a batch of %d rows; retrying it as %d + %d rows", len(inputs), half,
                        len(inputs) - half)
            return (_generate_isolated(engine, inputs[:half], gen, seeds[:half])
                    + _generate_isolated(engine, inputs[half:], gen, seeds[half:]))
        if len(inputs) == 1:
            return [RowError("model_error", f"generation failed: {type(e).__name__}: {e}")]
        return [r for x, s in zip(inputs, seeds) for r in _generate_isolated(engine, [x], gen, [s])]
