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
