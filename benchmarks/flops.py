"""FLOP counts and this machine's matmul FLOP/s, for model FLOPs utilisation.

A generate call's FLOPs = its prefill (counted by torch's FlopCounterMode on a real forward with
eager attention, so attention matmuls are counted) + one decode step per further token, counted
analytically: 2 x (the language model's matmul weights + lm_head) + 4 x context x heads x head_dim
per layer for attention.
"""

from __future__ import annotations

import time


def prefill_flops(model, inputs: dict) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def decode_step_flops(text_config, context: int) -> float:
    c = text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q = c.hidden_size * c.num_attention_heads * head_dim
    kv = 2 * c.hidden_size * c.num_key_value_heads * head_dim
    o = c.num_attention_heads * head_dim * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    per_layer = 2 * (q + kv + o + mlp) + 4 * context * c.num_attention_heads * head_dim
    return c.num_hidden_layers * per_layer + 2 * c.hidden_size * c.vocab_size


def generate_flops(prefill: float, text_config, prompt_tokens: int, output_tokens: int) -> float:
    """The first new token comes out of the prefill; each further one costs a decode step."""
    return prefill + sum(decode_step_flops(text_config, prompt_tokens + t) for t in range(1, max(output_tokens, 1)))


def matmul_flops_per_s(device: str = "cpu", dtype: str = "float32", n: int = 1024, seconds: float = 1.0) -> float:
    """Best FLOP/s of square matmuls over about `seconds`, with torch's default threads."""
    import torch

    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best
