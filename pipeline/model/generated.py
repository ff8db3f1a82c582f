"""What the engine returns for a row, whichever scheduling made it (engine's static generate, continuous)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    output_tokens: int
    # "stop": the model ended the row (EOS) or a stop string did; "length": it hit max_new_tokens;
    # "cancelled": its caller stopped it (continuous batching: a client that left)
    finish_reason: str = "length"
    token_ids: list[int] = field(default_factory=list)  # the generated tokens (EOS excluded), for the quality flags
