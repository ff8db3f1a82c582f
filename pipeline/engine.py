"""The model engine: load a LLaVA checkpoint once, generate for batches of preprocessed inputs.

Plain Python (no Ray): the Generate stage, tests and GPU checks call it directly. Batches are
collated with left padding; images of different anyres patch counts are zero-padded to the
batch's largest (the model strips the padding again from image_sizes), so a mixed batch gives the
same tokens as one-by-one generation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.config import GenerationConfig


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    output_tokens: int


def row_seed(seed: int, *keys: str | None) -> int:
    """A sampling seed for one (id, prompt): stable across runs, batches and replicas."""
    digest = hashlib.sha256("\x1f".join([str(seed), *(k or "" for k in keys)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Engine:
    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa",
                 tp: int = 1):
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        if tp > 1:  # this process is one rank of a tensor-parallel replica (pipeline/tensor_parallel.py)
            from transformers.distributed import DistributedConfig

            self.model = AutoModelForImageTextToText.from_pretrained(
                model_path, dtype=self.dtype, attn_implementation=attn_implementation,
                distributed_config=DistributedConfig(tp_plan="auto", tp_size=tp),
            ).eval()
            self.device = self.model.device  # cuda:LOCAL_RANK, or cpu
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(
                model_path, dtype=self.dtype, attn_implementation=attn_implementation
            ).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = next(i for i in (gen.pad_token_id, self.tokenizer.pad_token_id, min(self.eos_ids)) if i is not None)

    def generate(self, inputs: list[dict[str, np.ndarray]], gen: GenerationConfig,
                 seeds: list[int] | None = None) -> list[Generated]:
        """Generate for a batch; results are in input order."""
        results: list[Generated | None] = [None] * len(inputs)
        # Videos with different frame counts cannot share one tensor: one model call per count.
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(x["pixel_values_videos"].shape[0] if "pixel_values_videos" in x else 0, []).append(i)
        for idx in groups.values():
            group_seeds = [seeds[i] for i in idx] if seeds is not None else None
            for i, r in zip(idx, self._generate([inputs[i] for i in idx], gen, group_seeds)):
                results[i] = r
        return results

    def _generate(self, inputs, gen: GenerationConfig, seeds) -> list[Generated]:
        import torch

        batch = self.collate(inputs)
        kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=False, pad_token_id=self.pad_id)
        if gen.temperature > 0:
            kwargs["logits_processor"] = [PerRowSampler(gen, seeds or [gen.seed] * len(inputs), self.device)]
        with torch.inference_mode():
            out = self.model.generate(**batch, **kwargs)
        new_tokens = out[:, batch["input_ids"].shape[1]:].tolist()
        results = []
        for x, tokens in zip(inputs, new_tokens):
            end = next((k + 1 for k, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
            results.append(Generated(text=text, prompt_tokens=len(x["input_ids"]), output_tokens=end))
        return results

    def collate(self, inputs: list[dict[str, np.ndarray]]) -> dict:
        """Left-pad token ids; stack image patches (zero-padded to the most patches) and video frames."""
        import torch

        width = max(len(x["input_ids"]) for x in inputs)
        ids = np.full((len(inputs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(inputs), width), dtype=np.int64)
        for row, x in enumerate(inputs):
            ids[row, width - len(x["input_ids"]):] = x["input_ids"]
            mask[row, width - len(x["input_ids"]):] = 1
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        images = [x for x in inputs if "pixel_values" in x]
        if images:
            most = max(x["pixel_values"].shape[0] for x in images)
            pixels = np.zeros((len(images), most, *images[0]["pixel_values"].shape[1:]), dtype=np.float32)
            for row, x in enumerate(images):
                pixels[row, : x["pixel_values"].shape[0]] = x["pixel_values"]
            batch["pixel_values"] = torch.from_numpy(pixels)
            batch["image_sizes"] = torch.from_numpy(np.stack([x["image_sizes"] for x in images]).astype(np.int64))
            batch["batch_num_images"] = torch.ones(len(images), dtype=torch.int64)
        videos = [x for x in inputs if "pixel_values_videos" in x]
        if videos:
            batch["pixel_values_videos"] = torch.from_numpy(np.stack([x["pixel_values_videos"] for x in videos]))
        return {k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else None) for k, v in batch.items()}


class PerRowSampler:
    """Samples each row from its own seeded generator, then forces that token (generation runs
    greedy), so a row's sampled text does not depend on which rows share its batch."""

    def __init__(self, gen: GenerationConfig, seeds: list[int], device):
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(gen.temperature)])
        if gen.top_k:
            self.warpers.append(TopKLogitsWarper(gen.top_k))
        if gen.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(gen.top_p))
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(self.warpers(input_ids, scores.float()), dim=-1)
        forced = torch.full_like(scores, float("-inf"))
        for row, g in enumerate(self.generators):
            forced[row, torch.multinomial(probs[row], 1, generator=g)] = 0.0
        return forced
