"""Model families: which LLaVA a checkpoint is (read from its config) and what media it takes.

| family            | config                                   | images per prompt | video                      |
|-------------------|------------------------------------------|-------------------|----------------------------|
| llava_onevision   | model_type llava_onevision (ov, si)      | one or several    | native (`<video>` token)   |
| llava_interleave  | model_type llava, text model qwen2       | one or several    | N frames as N `<image>`s   |
| llava             | model_type llava, text model llama (1.5) | exactly one       | none: `unsupported_media`  |
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedMedia(Exception):
    """The model cannot take this row's media (e.g. a video for LLaVA-1.5): an `unsupported_media` row."""

    error_type = "unsupported_media"


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    video: str  # "native": the processor's video input; "frames": video frames as images; "none"
    multi_image: bool

    def check(self, media_type: str, num_images: int) -> None:
        """Raise UnsupportedMedia when this family cannot take the media."""
        if media_type == "video" and self.video == "none":
            raise UnsupportedMedia(f"{self.title} takes one image per prompt, not video: use a LLaVA-OneVision "
                                   "or LLaVA-Interleave model for video rows")
        if media_type == "image" and num_images > 1 and not self.multi_image:
            raise UnsupportedMedia(f"{self.title} takes one image per prompt, not {num_images}: use a "
                                   "LLaVA-OneVision or LLaVA-Interleave model for `uris` rows")


FAMILIES = {
    "llava_onevision": Family("llava_onevision", "LLaVA-OneVision", video="native", multi_image=True),
    "llava_interleave": Family("llava_interleave", "LLaVA-Interleave", video="frames", multi_image=True),
    "llava": Family("llava", "LLaVA-1.5", video="none", multi_image=False),
}


def detect_family(config) -> Family:
    """The family of a transformers config (AutoConfig.from_pretrained of the checkpoint)."""
    if config.model_type == "llava_onevision":
        return FAMILIES["llava_onevision"]
    if config.model_type == "llava":
        text = getattr(config.text_config, "model_type", None)
        # LLaVA-Interleave is LlavaForConditionalGeneration on Qwen; LLaVA-1.5 on Llama (Vicuna).
        return FAMILIES["llava_interleave" if text in ("qwen2", "qwen") else "llava"]
    raise ValueError(f"model type {config.model_type!r} is not a supported LLaVA family; supported: "
                     "llava_onevision (LLaVA-OneVision), llava with a Qwen2 text model (LLaVA-Interleave), "
                     "llava with a Llama text model (LLaVA-1.5)")
