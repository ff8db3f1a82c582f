"""Vision features once per distinct media: K questions about one item run the vision tower once.

The engine hands the model precomputed features (transformers' `mm_encoder_outputs`) instead of
pixels. Media are keyed by content (a hash of their arrays), so the K (item, question) rows of one
item share one encoding whether they arrive in one batch or, split at a batch boundary or into
length groups, in a later call: the features of recent calls are kept, the least recently used
dropped first beyond CACHE_TOKENS feature rows.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.model.families import Family

_TEXT_KEYS = ("input_ids",)


def media_key(inputs: dict[str, np.ndarray]) -> str | None:
    """A content hash of one row's media arrays (None when it has none)."""
    h = hashlib.sha256()
    found = False
    for name in sorted(k for k in inputs if k not in _TEXT_KEYS):
        a = np.ascontiguousarray(inputs[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
        found = True
    return h.hexdigest() if found else None


# Feature rows (one per visual token) kept between calls: for a 7B model (hidden 3,584, bf16)
# about 235 MB, four anyres images or twenty 8-frame videos.
CACHE_TOKENS = 32_768


class VisionCache:
    """Encodes the media of a batch, each distinct media once, reusing recent calls' features."""

    def __init__(self, model, family: Family, device, dtype):
        self.family, self.device, self.dtype = family, device, dtype
        self.base = model.model  # LlavaModel / LlavaOnevisionModel: get_image_features, get_video_features
        self.recent: dict[str, dict] = {}  # media key -> features, least recently used first

    def encoder_outputs(self, inputs: list[dict[str, np.ndarray]]) -> dict:
        """`mm_encoder_outputs` for generate: image and video features in the batch's token order."""
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        keys = [media_key(x) for x in inputs]
        todo = {}
        for k, x in zip(keys, inputs):
            if k is not None and k not in self.recent:
                todo.setdefault(k, x)
        self.recent.update(self._encode(todo))
        current = {k: self.recent.pop(k) for k in dict.fromkeys(keys) if k is not None}
        self.recent.update(current)  # dicts keep insertion order: the least recently used come first
        kept = sum(_rows(f) for f in self.recent.values())
        for k in [k for k in self.recent if k not in current]:
            if kept <= CACHE_TOKENS:
                break
            kept -= _rows(self.recent.pop(k))
        images, videos = [], []
        for k in keys:
            if k is not None:
                images += current[k].get("images", [])
                videos += current[k].get("video", [])
        out = {}
        if images:
            out["image"] = BaseModelOutputWithPooling(pooler_output=images)
        if videos:
            out["video"] = BaseModelOutputWithPooling(pooler_output=torch.cat(videos)[None])  # the model flattens it
        return out

    def _encode(self, todo: dict[str, dict]) -> dict[str, dict]:
        """Features of each media: {"images": [per-image (tokens, dim)]} or {"video": [(tokens, dim)]}."""
        import torch

        feats: dict[str, dict] = {k: {} for k in todo}
        with torch.inference_mode():
            image_rows = [(k, x) for k, x in todo.items() if "pixel_values" in x]
            if image_rows:
                per_image = self._images([x for _, x in image_rows])
                for k, x in image_rows:
                    n = x["pixel_values"].shape[0]
                    feats[k]["images"], per_image = per_image[:n], per_image[n:]
            by_frames: dict[tuple, list] = {}  # videos of equal shape share one vision call
            for k, x in todo.items():
                if "pixel_values_videos" in x:
                    by_frames.setdefault(x["pixel_values_videos"].shape, []).append(k)
            for same in by_frames.values():
                pixels = self._tensor(np.stack([todo[k]["pixel_values_videos"] for k in same]))
                out = self.base.get_video_features(pixel_values_videos=pixels, return_dict=True).pooler_output
                for k, f in zip(same, out):
                    feats[k]["video"] = [f]
        return feats

    def _images(self, rows: list[dict]) -> list:
        """One vision call for every image of these rows; features per image, in order."""
        import torch

        if self.family.name == "llava_onevision":
            # (images, patches, C, H, W) per row; zero-padded to the most patches (the model strips
            # the padding again from image_sizes); several images in one row are not tiled (anyres).
            most = max(x["pixel_values"].shape[1] for x in rows)
            shape = rows[0]["pixel_values"].shape[2:]
            pixels = np.zeros((sum(x["pixel_values"].shape[0] for x in rows), most, *shape), dtype=np.float32)
            i = 0
            for x in rows:
                n, p = x["pixel_values"].shape[:2]
                pixels[i:i + n, :p] = x["pixel_values"]
                i += n
            sizes = np.concatenate([x["image_sizes"] for x in rows]).astype(np.int64)
            out = self.base.get_image_features(
                pixel_values=self._tensor(pixels), image_sizes=torch.from_numpy(sizes).to(self.device),
                batch_num_images=torch.tensor([x["pixel_values"].shape[0] for x in rows]), return_dict=True)
        else:  # llava: (images, C, H, W) per row
            out = self.base.get_image_features(
                pixel_values=self._tensor(np.concatenate([x["pixel_values"] for x in rows])), return_dict=True)
        return list(out.pooler_output)

    def _tensor(self, a: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device, self.dtype)


def _rows(features: dict) -> int:
    return sum(int(f.shape[0]) for f in features.get("images", []) + features.get("video", []))
