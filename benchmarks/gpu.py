"""Figure 6 (--gpu): the real LLaVA-OneVision 0.5B and 7B architectures with random weights,
32 frames per video, fixed 64-token outputs: videos per second per GPU and model FLOPs utilisation
(MFU), batched vs the sequential loop (batch 1).

Plain Python on torch + transformers only (no Ray, no PyAV: a GPU machine may have neither);
the frames are synthetic arrays that go through the real processor, so the model sees real shapes
(32 x 196 video tokens). Decode and preprocess are not in these figures: on a GPU node they run
on the CPU workers beside the model (figures 1-3).
"""

from __future__ import annotations

import time

import numpy as np

# The field's figures to beat (from the issue): per GPU.
REFERENCE = {
    "nemo_curator_nightly_floor_clips_per_s": 0.1,   # Qwen2.5-VL-7B, long windows
    "qwen25vl_7b_a100_videos_per_s": 13 / 60,        # about 13 videos/min, GPU ~20 % busy
    "h100_compute_bound_7b_32f_100tok_videos_per_s": 8.0,
}


def synthetic_video(frames: int, seed: int, size: int = 384) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (frames, size // 16, size // 16, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 16, axis=1), 16, axis=2)


def peak_flops(device: str, dtype: str) -> float:
    from benchmarks.flops import matmul_flops_per_s

    return matmul_flops_per_s(device, dtype, n=8192 if device == "cuda" else 1024, seconds=2.0)


def measure_model(name: str, device: str, frames: int, new_tokens: int, videos: int, batch_size: int,
                  peak: float, log=print) -> dict:
    import torch

    from benchmarks.flops import generate_flops, prefill_flops
    from benchmarks.models import build_model

    dtype = "bfloat16" if device == "cuda" else "float32"
    t = time.perf_counter()
    model, processor = build_model(name, device, dtype)
    load_s = time.perf_counter() - t
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe this video."}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = [processor(videos=[synthetic_video(frames, i)], text=prompt, return_tensors="pt") for i in range(videos)]
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def run(batch: list) -> float:
        x = {k: torch.cat([b[k] for b in batch]).to(device) for k in ("input_ids", "attention_mask")}
        x["pixel_values_videos"] = torch.cat([b["pixel_values_videos"] for b in batch]).to(device, getattr(torch, dtype))
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**x, **gen)  # noqa: F821 - deleted below, after its last use
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] - x["input_ids"].shape[1] == new_tokens
        return time.perf_counter() - t

    run(inputs[:1])  # warm-up (kernels, allocator)
    sequential = sum(run([x]) for x in inputs)
    batched = sum(run(inputs[i:i + batch_size]) for i in range(0, videos, batch_size))
    one = {k: v.to(device) for k, v in inputs[0].items()}
    one["pixel_values_videos"] = one["pixel_values_videos"].to(getattr(torch, dtype))
    flops = generate_flops(prefill_flops(model, one), model.config.text_config, int(one["input_ids"].shape[1]), new_tokens)
    seq_vps, batch_vps = videos / sequential, videos / batched
    result = {"model": name, "device": device, "dtype": dtype, "frames": frames, "new_tokens": new_tokens,
              "prompt_tokens": int(one["input_ids"].shape[1]), "videos": videos, "batch_size": batch_size,
              "build_s": round(load_s, 1), "flops_per_video": flops,
              "sequential_videos_per_s": round(seq_vps, 4), "batched_videos_per_s": round(batch_vps, 4),
              "speedup": round(batch_vps / seq_vps, 2),
              "mfu_sequential": round(flops * seq_vps / peak, 4), "mfu_batched": round(flops * batch_vps / peak, 4)}
    log(f"gpu {name} on {device}: {batch_vps:.3f} videos/s batched (x{result['speedup']} the loop), "
        f"MFU {result['mfu_batched']:.3f} (loop {result['mfu_sequential']:.3f})")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def measure(models: list[str], device: str | None = None, frames: int = 32, new_tokens: int = 64,
            videos: int = 16, batch_size: int = 8, log=print) -> dict:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        log("gpu: no CUDA device here: running the GPU figure's code path on the CPU (a check, not a figure)")
    dtype = "bfloat16" if device == "cuda" else "float32"
    peak = peak_flops(device, dtype)
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "matmul_flops_per_s": peak, "matmul_dtype": dtype, "reference": REFERENCE,
            "models": {m: measure_model(m, device, frames, new_tokens, videos, batch_size, peak, log) for m in models}}
