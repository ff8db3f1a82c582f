"""Random-weight LLaVA-OneVision models for the benchmarks (no download: built from config classes).

`small`: the real preprocessing (384x384 frames, SigLIP patch 14, 729 patches -> 196 tokens per
video frame) with a small vision tower and language model, so the model's compute dominates a
CPU run. `0.5b` and `7b`: the published architectures (Qwen2-0.5B/7B + SigLIP-SO400M), for GPUs.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.planning.sizing import QWEN2_SIZES, SIGLIP_SO400M

# The published llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf shapes (pipeline.planning.sizing), with the
# vocabulary sizes these benchmarks have always used.
ARCHITECTURES = {
    "tiny-384": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                     text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)),
    "small": dict(vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
                  text=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)),
    "0.5b": dict(vision=SIGLIP_SO400M, text=dict(QWEN2_SIZES["0.5b"], vocab_size=151647)),
    "7b": dict(vision=SIGLIP_SO400M, text=dict(QWEN2_SIZES["7b"], vocab_size=152128)),
}
IMAGE_SIZE, PATCH_SIZE = 384, 14


def config(name: str):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    from pipeline.testing.tiny_model import QWEN_TOKENS, build_tokenizer

    arch = ARCHITECTURES[name]
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    text = Qwen2Config(max_position_embeddings=32768, eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"], bos_token_id=None, rope_theta=1_000_000.0, **arch["text"])
    vision = SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False,
                                layer_norm_eps=1e-6, **arch["vision"])
    return LlavaOnevisionConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(),
        image_token_id=ids["<image>"], video_token_id=ids["<video>"],
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[IMAGE_SIZE * i, IMAGE_SIZE * j] for i in range(1, 7) for j in range(1, 7)],
        use_image_newline_parameter=True,
    ), tokenizer


def processor(tokenizer):
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    from pipeline.testing.tiny_model import ONEVISION_TEMPLATE

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    pinpoints = [[IMAGE_SIZE * i, IMAGE_SIZE * j] for i in range(1, 7) for j in range(1, 7)]
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tokenizer,
        num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=ONEVISION_TEMPLATE)


def build_model(name: str, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) with random weights, made directly on `device` in `dtype`."""
    import torch
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    cfg, tokenizer = config(name)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(cfg, dtype=getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(eos_token_id=cfg.text_config.eos_token_id,
                                               pad_token_id=cfg.text_config.pad_token_id, do_sample=False)
    return model, processor(tokenizer)


def write_checkpoint(name: str, out_dir: Path) -> Path:
    """A loadable checkpoint folder (`--model DIR`), marked as random-weight."""
    from pipeline.model.checkpoint import MARKER

    out = Path(out_dir)
    if (out / MARKER).exists():
        return out
    model, proc = build_model(name)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    (out / MARKER).write_text(f"RANDOM WEIGHTS (benchmarks.models {name!r}): its text is noise.\n")
    return out
