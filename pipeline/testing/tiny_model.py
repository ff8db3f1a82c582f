"""Write a tiny, RANDOM-WEIGHT LLaVA-OneVision checkpoint: the real architecture at small sizes.

    python -m pipeline.testing.tiny_model DIR

The folder loads like a hub checkpoint (`--model DIR`): config, safetensors weights, processor
(image + video processors, tokenizer) and the model card's chat template. Its text is noise.
Built without any download: the tokenizer is a small byte-level BPE trained here on a fixed text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MARKER = "RANDOM_WEIGHTS.txt"

# The chat template of the llava-hf LLaVA-OneVision checkpoints (their chat_template.json).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

_CORPUS = """\
Describe this video in detail. Describe this image in detail. What is happening in this clip?
A person walks along a beach at sunset while waves roll onto the sand. A red car drives down a
street lined with trees. Two cats sit on a windowsill and look outside. The camera pans across a
city skyline at night with bright lights. A dog runs through a field of grass chasing a ball.
How many people are in the scene? What color is the sky? Is it day or night? Where was it filmed?
The image shows a chart, a table, a kitchen, a mountain, a river, a bird and a bicycle.
"""


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


def build(out_dir: str | Path, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """Write the checkpoint to out_dir and return its path."""
    import torch
    from transformers import (
        GenerationConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab_size = -(-len(tokenizer) // 64) * 64  # padded like the real checkpoints
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    # Same structure as the real 0.5B config, scaled down: anyres grid up to 6x6 tiles, max 9 tiles.
    pinpoints = [[image_size * i, image_size * j] for i in range(1, 7) for j in range(1, 7)]
    text_config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        tie_word_embeddings=True, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        image_token_id=ids["<image>"],
        video_token_id=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=pinpoints,
        use_image_newline_parameter=True,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # Default-sized random weights make every input yield the same token; wide ones make the text
    # depend on the pixels and the prompt, so parity tests compare text that can differ.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], do_sample=False
    )
    model.save_pretrained(out)

    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    (out / MARKER).write_text(
        "This checkpoint has RANDOM WEIGHTS (pipeline.testing.tiny_model): its captions are noise.\n"
        "Use a real checkpoint, e.g. --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf, for real text.\n"
    )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="folder to write the checkpoint to")
    parser.add_argument("--image-size", type=int, default=32, help="vision tower input size (real: 384)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    path = build(args.dir, image_size=args.image_size, seed=args.seed)
    print(f"wrote a tiny RANDOM-WEIGHT LLaVA-OneVision checkpoint to {path}")


if __name__ == "__main__":
    main()
