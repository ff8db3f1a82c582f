"""Preprocess: frames + prompt -> model inputs, with the checkpoint's own HF processor and chat template.

Images become anyres patches (pixel_values + image_sizes), videos one 384x384 input per frame
(pixel_values_videos); the model stage then only collates and runs the model.
"""

from __future__ import annotations

import numpy as np


class Preprocessor:
    def __init__(self, model_path: str):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_path)

    def prompt_text(self, media_type: str, prompt: str) -> str:
        """The chat template applied to one user turn: the media, then the instruction."""
        conversation = [{"role": "user", "content": [{"type": media_type}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def build(self, media_type: str, frames: np.ndarray, prompt: str) -> dict[str, np.ndarray]:
        """Model inputs for one (item, prompt), without the batch dimension."""
        text = self.prompt_text(media_type, prompt)
        if media_type == "image":
            enc = self.processor(images=frames[0], text=text, return_tensors="np")
            return {
                "input_ids": enc["input_ids"][0],
                "pixel_values": enc["pixel_values"][0],
                "image_sizes": np.asarray(enc["image_sizes"][0]),
            }
        enc = self.processor(videos=[frames], text=text, return_tensors="np")
        return {"input_ids": enc["input_ids"][0], "pixel_values_videos": enc["pixel_values_videos"][0]}


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
