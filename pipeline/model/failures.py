"""How a model replica fails, as the batching and the tensor-parallel ranks both tell it."""

from __future__ import annotations


class ReplicaFailed(RuntimeError):
    """The replica died or hung on every attempt at this batch."""


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def free_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
