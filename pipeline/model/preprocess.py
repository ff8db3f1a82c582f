"""Preprocess: frames + prompt -> model inputs, with the checkpoint's own HF processor and chat template.

What a prompt holds follows the model family's card (pipeline.model.families): one image placeholder per
image; LLaVA-OneVision tiles a lone image into anyres patches (pixel_values + image_sizes) and takes
video as one 384x384 input per frame (pixel_values_videos); LLaVA-Interleave takes a video as its
frames, one `<image>` each; LLaVA-1.5 takes one image. The model stage then only collates and runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PromptTooLong(Exception):
    """The prompt (media tokens included) and the answer it may get do not fit the model's context."""

    error_type = "prompt_too_long"


class Preprocessor:
    def __init__(self, model_path: str, revision: str | None = None, trust_remote_code: bool = False):
        from pipeline.model.families import detect_family
        from pipeline.model.loading import LoadOptions, load_config, load_processor

        options = LoadOptions(revision=revision, trust_remote_code=trust_remote_code)
        self.processor = load_processor(model_path, options)
        config = load_config(model_path, options)
        self.family = detect_family(config)
        # The language model's trained positions: past them a RoPE model still runs, but on nonsense.
        text = getattr(config, "text_config", None) or config
        self.context_tokens: int | None = getattr(text, "max_position_embeddings", None)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise PromptTooLong unless the prompt and max_new_tokens new tokens fit the model's context."""
        if self.context_tokens and prompt_tokens + max_new_tokens > self.context_tokens:
            raise PromptTooLong(
                f"the prompt is {prompt_tokens:,} tokens (media included); with max_new_tokens {max_new_tokens:,} "
                f"that is past the model's context of {self.context_tokens:,} tokens: shorten the prompt, use fewer "
                "frames or images, or lower max_new_tokens")

    def content(self, media_type: str, num_images: int) -> list[dict]:
        """The media parts of the user turn, as the family's card writes them."""
        if media_type == "video" and self.family.video == "native":
            return [{"type": "video"}]
        return [{"type": "image"}] * num_images  # images, or a video's frames as images

    def prompt_text(self, media_type: str, prompt: str, num_images: int = 1,
                    conversation: list[dict] | None = None) -> str:
        """The chat template applied to one user turn (the media, then the instruction), or to a whole
        `conversation` (chat messages whose content parts {"type": "image"} and {"type": "video"}
        stand where the media go: one per image, one for a video)."""
        if conversation is None:
            media = [{"type": "video"}] if media_type == "video" else [{"type": "image"}] * num_images
            conversation = [{"role": "user", "content": [*media, {"type": "text", "text": prompt}]}]
        expanded = [{**m, "content": [q for part in m["content"] for q in (
            self.content(media_type, num_images) if part["type"] == "video" else [part])]} for m in conversation]
        return self.processor.apply_chat_template(expanded, add_generation_prompt=True)

    def build(self, media_type: str, frames: np.ndarray | Sequence[np.ndarray], prompt: str,
              conversation: list[dict] | None = None) -> dict[str, np.ndarray]:
        """Model inputs for one (item, prompt), without the batch dimension.

        frames: a video's (T, H, W, 3) frames, or the images of a row (one array, or a list of
        (H, W, 3) arrays of any sizes). `conversation` (see prompt_text) replaces the single user
        turn. Raises UnsupportedMedia when the family cannot take them.
        """
        self.family.check(media_type, len(frames))
        text = self.prompt_text(media_type, prompt, len(frames), conversation)
        # Our arrays are always (H, W, 3): said outright, or an image 1-3 pixels high is guessed channels-first.
        layout = {"input_data_format": "channels_last"}
        if media_type == "video" and self.family.video == "native":
            enc = self.processor(videos=[np.asarray(frames)], text=text, return_tensors="np", **layout)
            return {"input_ids": enc["input_ids"][0], "pixel_values_videos": enc["pixel_values_videos"][0]}
        images = list(frames)
        if self.family.name == "llava_onevision":
            # Nested: the images of one prompt (several are not tiled, as the model was trained).
            enc = self.processor(images=[images], text=[text], return_tensors="np", **layout)
            return {"input_ids": enc["input_ids"][0], "pixel_values": enc["pixel_values"],
                    "image_sizes": np.asarray(enc["image_sizes"])}
        enc = self.processor(images=images, text=text, return_tensors="np", **layout)
        return {"input_ids": enc["input_ids"][0], "pixel_values": enc["pixel_values"]}


def video_resize_spec(model_path: str) -> dict | None:
    """The checkpoint's video resize as arguments of `media.resize_frames` (the same torchvision
    call with the same parameters), or None when its video processor has no fixed output size."""
    try:
        from transformers import AutoVideoProcessor
        from transformers.image_utils import pil_torch_interpolation_mapping

        vp = AutoVideoProcessor.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - no video processor (e.g. LLaVA-1.5): frames go as decoded
        return None
    size = vp.size
    if not getattr(vp, "do_resize", False) or not (size and size.get("height") and size.get("width")):
        return None
    if getattr(vp, "do_center_crop", False):
        return None
    resample = vp.resample
    mode = pil_torch_interpolation_mapping[resample] if isinstance(resample, int) else resample
    return {"height": int(size["height"]), "width": int(size["width"]),
            "interpolation": getattr(mode, "value", "bilinear"), "antialias": True}
