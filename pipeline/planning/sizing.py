"""Sizing: devices per replica (tp), replicas, and the tokens a batch may hold, from the model's
shapes and the GPUs' memory. Printed before a run and by --dry-run; `python -m pipeline.planning.sizing`
prints the table of the real LLaVA-OneVision sizes (the README's).

Arithmetic (GB = 1e9 bytes):
- weights per GPU: the model is built on the meta device (no weights read) and each parameter is
  counted whole on every rank unless transformers' tensor-parallel plan splits it (the language
  model's layers, embeddings and head are split; the vision tower and norms are not).
- KV cache per token per GPU: 2 (K and V) x layers x kv_heads / tp x head_dim x dtype bytes.
- activations per token, the larger of the language model's prefill, one layer at a time,
  (4 x hidden + 3 x intermediate / tp) x dtype bytes, and the vision tower's over the patches
  behind one token (video: 729 patches pooled to 196 tokens per frame): patches per token x
  (4 x vision hidden + vision intermediate) x dtype bytes.
- usable memory: 90% of the GPU (CUDA context, NCCL buffers, the vision tower's activations and
  fragmentation live in the rest).
tp is the smallest power of two that divides the attention heads, KV heads, MLP width and
vocabulary, fits on one node, and leaves room for a batch of MIN_BATCH_TOKENS beside the weights;
replicas = GPUs // tp; the token budget is what the rest of usable memory holds. These are
estimates: a batch that runs out of memory anyway is split and retried (pipeline/model/batching.py).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from functools import lru_cache

GB = 1e9
USABLE_FRACTION = 0.9
MIN_BATCH_TOKENS = 8192  # one anyres image (~7.4k tokens) and its answer
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# The published LLaVA-OneVision checkpoints' shapes (their config.json), for the README's table
# and for hub ids when the hub cannot be reached; the random-weight builds of the real
# architectures (pipeline.testing.tiny_model --size 0.5b, benchmarks.models) take them from here.
# Vision: SigLIP-SO400M/14-384 (26 layers are used, no head).
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)
QWEN2_SIZES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "72b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=29568, vocab_size=152064, tie_word_embeddings=False),
}
KNOWN_MODELS = {f"llava-hf/llava-onevision-qwen2-{size}-ov-hf": size for size in QWEN2_SIZES}


def known_config(size: str):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(**SIGLIP_SO400M, image_size=384, patch_size=14, vision_use_head=False)
    return LlavaOnevisionConfig(text_config=Qwen2Config(**QWEN2_SIZES[size]).to_dict(), vision_config=vision.to_dict(),
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                vision_aspect_ratio="anyres_max_9")


@dataclass(frozen=True)
class ModelShape:
    name: str
    sharded_params: int  # split across the ranks by the tensor-parallel plan
    replicated_params: int  # whole on every rank
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    tokens_per_frame: int  # a video frame, after pooling
    tokens_per_image_max: int  # the largest image (anyres tiles + base + newlines)
    patches_per_frame: int  # vision tower positions behind one frame's tokens
    vision_hidden: int
    vision_intermediate: int

    @property
    def params(self) -> int:
        return self.sharded_params + self.replicated_params

    def video_tokens(self, num_frames: int, max_new_tokens: int) -> int:
        """One video's row: its frames' tokens, the answer, and ~64 for the prompt's text."""
        return num_frames * self.tokens_per_frame + max_new_tokens + 64

    def image_tokens(self, max_new_tokens: int) -> int:
        """The largest anyres image's row, likewise."""
        return self.tokens_per_image_max + max_new_tokens + 64

    def tp_options(self, most: int = 64) -> list[int]:
        """Powers of two that split heads, KV heads, MLP and vocabulary evenly."""
        return [tp for tp in (2**i for i in range(7)) if tp <= most
                and all(n % tp == 0 for n in (self.heads, self.kv_heads, self.intermediate, self.vocab))]

    def weights_bytes(self, tp: int, dtype_bytes: int) -> float:
        return (self.sharded_params / tp + self.replicated_params) * dtype_bytes

    def kv_bytes_per_token(self, tp: int, dtype_bytes: int) -> float:
        return 2 * self.layers * (self.kv_heads / tp) * self.head_dim * dtype_bytes

    def activation_bytes_per_token(self, tp: int, dtype_bytes: int) -> float:
        text = (4 * self.hidden + 3 * self.intermediate / tp) * dtype_bytes
        vision = (self.patches_per_frame / self.tokens_per_frame) * (4 * self.vision_hidden + self.vision_intermediate)
        return max(text, vision * dtype_bytes)  # the vision tower runs first, then the prefill


@lru_cache(maxsize=8)
def _shape_from_json(config_json: str, name: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.distributed.parallel_utils import _get_parameter_plan

    config_dict = json.loads(config_json)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = AutoModelForImageTextToText.from_config(config)
    sharded = replicated = 0
    for pname, p in model.named_parameters():  # tied weights are listed once
        style = _get_parameter_plan(pname, model.tp_plan)
        if style is None or (style == "rowwise" and pname.endswith(".bias")):  # rowwise bias: added after the reduce
            replicated += p.numel()
        else:
            sharded += p.numel()
    text, vision = config.get_text_config(), config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    side = vision.image_size // vision.patch_size
    if config.model_type == "llava_onevision":
        per_frame = math.ceil(side / 2) ** 2  # video frames are pooled 2x2 (729 -> 196 for SigLIP at 384)
        most = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).rsplit("_", 1)[-1])
        per_image = (most + 1) * side * side + int(math.sqrt(most)) * side  # tiles + base + a newline per row
    else:  # LLaVA 1.5 / Interleave: one image = one vision tower output, frames likewise
        per_frame = per_image = side * side
    return ModelShape(name=name, sharded_params=sharded, replicated_params=replicated,
                      layers=text.num_hidden_layers, heads=text.num_attention_heads,
                      kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                      head_dim=head_dim, hidden=text.hidden_size, intermediate=text.intermediate_size,
                      vocab=text.vocab_size, tokens_per_frame=per_frame, tokens_per_image_max=per_image,
                      patches_per_frame=side * side, vision_hidden=vision.hidden_size,
                      vision_intermediate=vision.intermediate_size)


def shape_of(config, name: str = "") -> ModelShape:
    """The shape of a transformers config (a PretrainedConfig)."""
    return _shape_from_json(json.dumps(config.to_dict(), sort_keys=True, default=str), name)


def read_config(model: str, storage=None):
    """The model's config: config.json of a local folder or object-store prefix, or a hub id's
    (the published LLaVA-OneVision shapes when the hub cannot be reached). None if unreadable."""
    from transformers import AutoConfig

    from pipeline.io.storage import filesystem, join, protocol_of

    if model.rstrip("/") in KNOWN_MODELS:
        return known_config(KNOWN_MODELS[model.rstrip("/")])
    try:
        if protocol_of(model) != "file":
            from pipeline.config import StorageConfig

            fs, path = filesystem(model, storage or StorageConfig())
            with fs.open(join(path, "config.json")) as f:
                return AutoConfig.for_model(**json.load(f))
        return AutoConfig.from_pretrained(model.removeprefix("file://"))
    except Exception:  # noqa: BLE001 - sizing is advice; the run reports a model it cannot load
        return None


@dataclass
class Plan:
    shape: ModelShape
    dtype: str
    gpu_memory_gb: float | None
    gpus: int | None
    tp: int
    replicas: int | None
    weights_gb: float  # per GPU
    kv_bytes_per_token: float  # per GPU
    token_budget: int | None  # tokens (prompt + new) one replica's batch may hold
    fits: bool

    def line(self, num_frames: int | None = None, max_new_tokens: int = 0) -> str:
        s = self.shape
        text = (f"sizing: {s.name or 'model'} {s.params / 1e9:.2f} B params, {self.dtype}: tp {self.tp} -> "
                f"{self.weights_gb:.1f} GB weights per device, KV cache {self.kv_bytes_per_token / 1024:.0f} KiB "
                f"per token per device")
        if self.gpu_memory_gb is None:
            return text
        if not self.fits:
            return text + (f"; does NOT fit on {self.gpu_memory_gb:g} GB GPUs at any tp that splits this model "
                           f"on one node (tp options: {s.tp_options()})")
        text += f"; on {self.gpu_memory_gb:g} GB GPUs"
        if self.replicas is not None:
            text += f" x {self.gpus}: {self.replicas} replica(s) of tp {self.tp}"
        text += f", batch budget ~{self.token_budget:,} tokens per replica"
        if num_frames:
            videos = self.token_budget // s.video_tokens(num_frames, max_new_tokens)
            images = self.token_budget // s.image_tokens(max_new_tokens)
            text += (f" (~{videos} videos of {num_frames} frames at {s.tokens_per_frame} tokens each, "
                     f"or ~{images} largest anyres images)")
        return text


def plan(shape: ModelShape, gpu_memory_gb: float | None = None, gpus: int | None = None,
         gpus_per_node: int | None = None, dtype: str = "bfloat16", tp: int | None = None) -> Plan:
    """The smallest tp that fits (or the given tp), replicas and the token budget per batch."""
    b = DTYPE_BYTES[dtype]
    options = shape.tp_options(most=gpus_per_node or gpus or 64)
    per_token = lambda t: shape.kv_bytes_per_token(t, b) + shape.activation_bytes_per_token(t, b)  # noqa: E731
    usable = gpu_memory_gb * GB * USABLE_FRACTION if gpu_memory_gb else None
    fits = True
    if tp is None:
        fitting = [t for t in options if usable is None
                   or shape.weights_bytes(t, b) + MIN_BATCH_TOKENS * per_token(t) <= usable]
        fits = bool(fitting)
        tp = fitting[0] if fitting else (options[-1] if options else 1)
    budget = None
    if usable is not None:
        room = usable - shape.weights_bytes(tp, b)
        fits = fits and room >= MIN_BATCH_TOKENS * per_token(tp)
        budget = max(0, int(room / per_token(tp)))
    return Plan(shape=shape, dtype=dtype, gpu_memory_gb=gpu_memory_gb, gpus=gpus, tp=tp,
                replicas=(gpus // tp) if gpus else None, weights_gb=shape.weights_bytes(tp, b) / GB,
                kv_bytes_per_token=shape.kv_bytes_per_token(tp, b), token_budget=budget, fits=fits)


class SizingError(ValueError):
    """The settings cannot work for this model (for example a tp that does not split its heads)."""


def check_run(cfg, gpu_memory_gb: float | None = None, gpus: int | None = None, gpus_per_node: int | None = None,
              device: str = "cuda") -> list[str]:
    """The plan for a run's settings as log lines, with advice where --tp, --replicas or
    --batch-size disagree with it; raises SizingError for a tp the model cannot be split by."""
    config = read_config(cfg.model, getattr(cfg, "storage", None))
    if config is None:
        return [f"sizing: skipped (cannot read the config of {cfg.model})"]
    shape = shape_of(config, cfg.model)
    if cfg.tp not in shape.tp_options():
        raise SizingError(f"--tp {cfg.tp} does not split {cfg.model} evenly ({shape.heads} attention heads, "
                          f"{shape.kv_heads} KV heads, MLP {shape.intermediate}, vocabulary {shape.vocab}); "
                          f"use one of {shape.tp_options()}")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    chosen = plan(shape, gpu_memory_gb, gpus, gpus_per_node, dtype, tp=cfg.tp)
    lines = [chosen.line(cfg.num_frames, cfg.generation.max_new_tokens)]
    if device == "cuda" and not gpu_memory_gb:
        lines.append("sizing: GPU memory not known (--gpu-memory-gb): no batch budget")
    if gpu_memory_gb:
        best = plan(shape, gpu_memory_gb, gpus, gpus_per_node, dtype)
        if not chosen.fits:
            lines.append(f"sizing: WARNING --tp {cfg.tp} leaves no room for a batch beside the weights on "
                         f"{gpu_memory_gb:g} GB GPUs; " + (f"use --tp {best.tp}" if best.fits else "use larger GPUs"))
        elif best.tp < cfg.tp:
            lines.append(f"sizing: --tp {best.tp} would fit too, with {cfg.tp // best.tp}x the replicas per GPU")
        per_video = shape.video_tokens(cfg.num_frames, cfg.generation.max_new_tokens)
        if chosen.fits and cfg.batch_size * per_video > chosen.token_budget:
            lines.append(f"sizing: --batch-size {cfg.batch_size} videos need ~{cfg.batch_size * per_video:,} tokens, "
                         f"over the budget: batches that run out of memory are split and retried")
    if gpus and device == "cuda" and cfg.tp * cfg.replicas > gpus:
        lines.append(f"sizing: --replicas {cfg.replicas} x --tp {cfg.tp} needs {cfg.tp * cfg.replicas} GPUs, the "
                     f"cluster has {gpus} now: replicas beyond {gpus // cfg.tp} wait for GPUs")
    if gpus_per_node is not None and device == "cuda" and cfg.tp > gpus_per_node:
        lines.append(f"sizing: WARNING no node has {cfg.tp} GPUs now (most: {gpus_per_node}); a replica's GPUs must "
                     f"be on one node, so the run waits until the autoscaler adds such a node")
    return lines


def readme_table(gpu_sizes=(24, 40, 80, 141), gpus: int = 8) -> str:
    """The README's table: each published size on each GPU size, 8 GPUs per node."""
    rows = ["| model | params | bf16 weights | KV cache / token (tp 1) | " + " | ".join(f"{g} GB GPUs" for g in gpu_sizes) + " |",
            "|---|---|---|---|" + "---|" * len(gpu_sizes)]
    for size in QWEN2_SIZES:
        shape = shape_of(known_config(size), f"LLaVA-OneVision {size.upper()}")
        cells = []
        for g in gpu_sizes:
            p = plan(shape, g, gpus)
            cells.append(f"tp {p.tp} x {p.replicas}, {p.weights_gb:.1f} GB/GPU, ~{p.token_budget // 1000}k tokens"
                         if p.fits else "does not fit")
        rows.append(f"| {shape.name} | {shape.params / 1e9:.2f} B | {shape.weights_bytes(1, 2) / GB:.1f} GB | "
                    f"{shape.kv_bytes_per_token(1, 2) / 1024:.0f} KiB | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Print the sizing plan of a model (or, without --model, the README's table).")
    p.add_argument("--model", help="hub id, local folder or s3:// prefix")
    p.add_argument("--gpu-memory-gb", type=float, default=80)
    p.add_argument("--gpus", type=int, default=8, help="GPUs in all")
    p.add_argument("--gpus-per-node", type=int, help="default: --gpus")
    p.add_argument("--num-frames", type=int, default=8)
    a = p.parse_args(argv)
    if not a.model:
        print(readme_table())
        return
    config = read_config(a.model)
    if config is None:
        raise SystemExit(f"cannot read the config of {a.model}")
    print(plan(shape_of(config, a.model), a.gpu_memory_gb, a.gpus, a.gpus_per_node).line(a.num_frames))


if __name__ == "__main__":
    main()
