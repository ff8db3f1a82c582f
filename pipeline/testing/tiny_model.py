"""Write a tiny, RANDOM-WEIGHT LLaVA checkpoint: the real architecture of a family at small sizes.

    python -m pipeline.testing.tiny_model DIR [--family llava_onevision|llava_interleave|llava]

The folder loads like a hub checkpoint (`--model DIR`): config, safetensors weights, processor
(image (+ video) processor, tokenizer) and the model card's chat template. Its text is noise.
Built without any download: the tokenizer is a small byte-level BPE trained here on a fixed text.
Families: llava_onevision (LLaVA-OneVision: Qwen2 + SigLIP, anyres images, video), llava_interleave
(LLaVA-Interleave-Qwen: LlavaForConditionalGeneration on Qwen2 + SigLIP, several images, video as
frames), llava (LLaVA-1.5: Llama + CLIP, one image). `--size 0.5b` writes LLaVA-OneVision at the real
0.5B sizes (about 0.9 B parameters, bf16 on disk) for GPU checks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.model.checkpoint import MARKER

FAMILIES = ("llava_onevision", "llava_interleave", "llava")

# The chat templates of the llava-hf checkpoints, one per family (OneVision and 1.5: their
# chat_template.json; Interleave: the prompt format its card shows).
ONEVISION_TEMPLATE = (
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
# llava-interleave-qwen-*-hf, one `<image>` per image or video frame:
# `<|im_start|>user <image><image>\nPROMPT<|im_end|><|im_start|>assistant`
INTERLEAVE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant' }}{% endif %}"
)
# llava-1.5-*-hf: `USER: <image>\nPROMPT ASSISTANT:`
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
LLAMA_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

_CORPUS = """\
Describe this video in detail. Describe this image in detail. What is happening in this clip?
A person walks along a beach at sunset while waves roll onto the sand. A red car drives down a
street lined with trees. Two cats sit on a windowsill and look outside. The camera pans across a
city skyline at night with bright lights. A dog runs through a field of grass chasing a ball.
How many people are in the scene? What color is the sky? Is it day or night? Where was it filmed?
The image shows a chart, a table, a kitchen, a mountain, a river, a bird and a bicycle.
USER: ASSISTANT: user assistant
"""


def build_tokenizer(family: str = "llava_onevision"):
    """Qwen-style special tokens (ChatML) for the Qwen families; Llama-style (<s> first) for LLaVA-1.5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    llama = family == "llava"
    special = LLAMA_TOKENS if llama else [t for t in QWEN_TOKENS if family == "llava_onevision" or t != "<video>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its progress lines go to stdout as blank lines
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if llama:
        bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>", padding_side="left",
                                       extra_special_tokens={"image_token": "<image>"})
    extra = {"image_token": "<image>", **({"video_token": "<video>"} if "<video>" in special else {})}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left", extra_special_tokens=extra)


def _widen(model):
    # Default-sized random weights make every input yield the same token; wide ones make the text
    # depend on the pixels and the prompt, so parity tests compare text that can differ.
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)


def _qwen2(tokenizer, size: str):
    from transformers import Qwen2Config

    from pipeline.planning.sizing import QWEN2_SIZES

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    dims = (dict(QWEN2_SIZES["0.5b"], max_position_embeddings=32768, rope_theta=1_000_000.0, vocab_size=152000)
            if size == "0.5b" else
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=8192, vocab_size=-(-len(tokenizer) // 64) * 64,
                 tie_word_embeddings=True))
    return Qwen2Config(**dims, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)


def _siglip(image_size: int, patch_size: int, size: str):
    from transformers import SiglipVisionConfig

    if size == "0.5b":  # SigLIP-SO400M/14-384 without its last layer and head, as LLaVA uses it
        from pipeline.planning.sizing import SIGLIP_SO400M

        return SiglipVisionConfig(**SIGLIP_SO400M, image_size=384, patch_size=14, vision_use_head=False)
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, vision_use_head=False)


def _onevision(tokenizer, image_size: int, patch_size: int, size: str):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    if size == "0.5b":
        image_size, patch_size = 384, 14
    # Same structure as the real config: anyres grid up to 6x6 tiles, max 9 tiles.
    pinpoints = [[image_size * i, image_size * j] for i in range(1, 7) for j in range(1, 7)]
    config = LlavaOnevisionConfig(
        text_config=_qwen2(tokenizer, size).to_dict(),
        vision_config=_siglip(image_size, patch_size, size).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=pinpoints,
        use_image_newline_parameter=True,
    )
    side = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=side, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=side),
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_TEMPLATE,
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


def _interleave(tokenizer, image_size: int, patch_size: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessor

    config = LlavaConfig(
        text_config=_qwen2(tokenizer, "tiny").to_dict(),
        vision_config=_siglip(image_size, patch_size, "tiny").to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="full",
        num_additional_image_tokens=0, chat_template=INTERLEAVE_TEMPLATE,
    )
    return LlavaForConditionalGeneration(config), processor


def _llava15(tokenizer, image_size: int, patch_size: int):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAMA_TOKENS}
    text_config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
    )
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=image_size, patch_size=patch_size, projection_dim=32)
    config = LlavaConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
        image_token_index=ids["<image>"], image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA15_TEMPLATE,
    )
    return LlavaForConditionalGeneration(config), processor


def build(out_dir: str | Path, family: str = "llava_onevision", image_size: int = 32, patch_size: int = 8,
          seed: int = 0, size: str = "tiny") -> Path:
    """Write the checkpoint to out_dir and return its path."""
    import torch
    from transformers import GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    if size != "tiny" and family != "llava_onevision":
        raise ValueError("--size 0.5b is available for llava_onevision only")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    torch.manual_seed(seed)
    if family == "llava_onevision":
        model, processor = _onevision(tokenizer, image_size, patch_size, size)
    elif family == "llava_interleave":
        model, processor = _interleave(tokenizer, image_size, patch_size)
    else:
        model, processor = _llava15(tokenizer, image_size, patch_size)
    model.eval()
    if size == "tiny":
        _widen(model)
    else:  # real sizes keep the default initialisation (finite in bf16) and are written in bf16
        model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False,
        **({"bos_token_id": tokenizer.bos_token_id} if family == "llava" else {}),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / MARKER).write_text(
        "This checkpoint has RANDOM WEIGHTS (pipeline.testing.tiny_model): its captions are noise.\n"
        "Use a real checkpoint, e.g. --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf, for real text.\n"
    )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="folder to write the checkpoint to")
    parser.add_argument("--family", choices=FAMILIES, default="llava_onevision",
                        help="LLaVA-OneVision, LLaVA-Interleave-Qwen or LLaVA-1.5 architecture")
    parser.add_argument("--image-size", type=int, default=32, help="vision tower input size (real: 384, 336 for LLaVA-1.5)")
    parser.add_argument("--size", choices=["tiny", "0.5b"], default="tiny",
                        help="tiny sizes, or the real LLaVA-OneVision 0.5B sizes (random weights too)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    path = build(args.dir, family=args.family, image_size=args.image_size, seed=args.seed, size=args.size)
    print(f"wrote a {args.size} RANDOM-WEIGHT {args.family} checkpoint to {path}")


if __name__ == "__main__":
    main()
