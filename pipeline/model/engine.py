"""The model engine: load a LLaVA checkpoint once, generate for batches of preprocessed inputs.

Plain Python (no Ray): the Generate stage, tests and GPU checks call it directly. Batches are
collated with left padding; the vision tower runs once per distinct media of a batch
(pipeline.model.vision) and the model gets its features, so a mixed batch of images (of any anyres
patch count), image sets and videos (of any frame count) gives the same tokens as one-by-one generation.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.config import GenerationConfig
from pipeline.model.generated import Generated


def row_seed(seed: int, *keys: str | None) -> int:
    """A sampling seed for one (id, prompt): stable across runs, batches and replicas."""
    digest = hashlib.sha256("\x1f".join([str(seed), *(k or "" for k in keys)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Engine:
    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa",
                 tp: int = 1, *, quantization: str | None = None, revision: str | None = None,
                 trust_remote_code: bool = False, scheduling: str = "continuous", token_budget: int | None = None,
                 max_rows: int | None = None):
        import torch

        from pipeline.model.families import detect_family
        from pipeline.model.loading import LoadOptions, load_model, load_tokenizer
        from pipeline.model.vision import VisionCache

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        options = LoadOptions(revision=revision, trust_remote_code=trust_remote_code)
        # tp > 1: this process is one rank of a tensor-parallel replica (pipeline/model/tensor_parallel.py)
        self.model = load_model(model_path, options, device=self.device, dtype=self.dtype,
                                attn_implementation=attn_implementation, quantization=quantization, tp=tp)
        self.device = self.model.device  # cuda:LOCAL_RANK under tensor parallelism
        self.family = detect_family(self.model.config)
        self.tokenizer = load_tokenizer(model_path, options)
        self.vision = VisionCache(self.model, self.family, self.device, self.dtype)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = next(i for i in (gen.pad_token_id, self.tokenizer.pad_token_id, min(self.eos_ids)) if i is not None)
        # continuous: rows join and leave between decode steps (pipeline/model/continuous.py);
        # static: one model.generate per batch (the baseline the benchmarks compare against)
        self.continuous = scheduling == "continuous"
        if self.continuous:
            from pipeline.model.continuous import check_cache_layers

            try:
                check_cache_layers(self.model)
            except NotImplementedError:
                self.continuous = False
        self.token_budget, self.max_rows = token_budget or self._sized_token_budget(tp), max_rows

    def _sized_token_budget(self, tp: int) -> int | None:
        """On a GPU, the sizing plan's token budget for this replica (pipeline/planning/sizing.py);
        None elsewhere (the scheduler's CPU default)."""
        import torch

        if self.device.type != "cuda":
            return None
        from pipeline.planning.sizing import GB, plan, shape_of

        try:
            memory = torch.cuda.get_device_properties(self.device).total_memory / GB
            return plan(shape_of(self.model.config), gpu_memory_gb=memory, dtype=str(self.dtype).rsplit(".", 1)[-1],
                        tp=tp).token_budget or None
        except Exception:  # noqa: BLE001 - an unusual config: the default budget
            return None

    def scheduler(self, max_rows: int | None = None):
        """A continuous-batching scheduler over this engine's model (pipeline.model.continuous)."""
        from pipeline.model.continuous import Scheduler

        return Scheduler(self, self.token_budget, max_rows or self.max_rows)

    def row_sampler(self, gen: GenerationConfig, seed: int):
        """How one row picks its next token from its logits (continuous batching): greedy, or from its
        own seeded generator (the semantics of PerRowSampler)."""
        return RowSampler(gen, seed, self.device)

    def generate(self, inputs: list[dict[str, np.ndarray]], gen: GenerationConfig,
                 seeds: list[int] | None = None, streamer=None) -> list[Generated]:
        """Generate for a batch; results are in input order. `streamer` (transformers' BaseStreamer
        interface) gets the prompt ids, then each step's new token of every row (the online server;
        it runs the static path). Continuous scheduling: the rows go through a Scheduler, joining as
        the slots (max_rows) and the token budget allow and leaving at their own end."""
        import torch

        if self.continuous and streamer is None:
            from pipeline.model.continuous import Row

            seeds = seeds or [gen.seed] * len(inputs)
            return self.scheduler().run([Row(x, gen, s) for x, s in zip(inputs, seeds)])

        batch = self.collate(inputs)
        # Vision features once per distinct media (K questions about one item share them).
        batch["mm_encoder_outputs"] = self.vision.encoder_outputs(inputs)
        kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=False, pad_token_id=self.pad_id, streamer=streamer)
        if gen.repetition_penalty != 1.0:  # transformers' own logits processors (before PerRowSampler's)
            kwargs["repetition_penalty"] = gen.repetition_penalty
        if gen.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = gen.no_repeat_ngram_size
        if gen.temperature > 0:
            kwargs["logits_processor"] = [PerRowSampler(gen, seeds or [gen.seed] * len(inputs), self.device)]
        with torch.inference_mode():
            out = self.model.generate(**batch, **kwargs)
        new_tokens = out[:, batch["input_ids"].shape[1]:].tolist()
        results = []
        for x, tokens in zip(inputs, new_tokens):
            eos = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
            end = len(tokens) if eos is None else eos + 1
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
            results.append(Generated(text=text, prompt_tokens=len(x["input_ids"]), output_tokens=end,
                                     finish_reason="length" if eos is None else "stop", token_ids=tokens[:eos]))
        return results

    def collate(self, inputs: list[dict[str, np.ndarray]]) -> dict:
        """Left-pad the token ids (the media go to the model as features, see pipeline.model.vision)."""
        import torch

        width = max(len(x["input_ids"]) for x in inputs)
        ids = np.full((len(inputs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(inputs), width), dtype=np.int64)
        for row, x in enumerate(inputs):
            ids[row, width - len(x["input_ids"]):] = x["input_ids"]
            mask[row, width - len(x["input_ids"]):] = 1
        return {"input_ids": torch.from_numpy(ids).to(self.device), "attention_mask": torch.from_numpy(mask).to(self.device)}


def sampling_warpers(gen: GenerationConfig):
    """transformers' temperature, top-k and top-p warpers of a sampled generation: one list for both
    schedulings, so a row samples from the same distribution in a static batch and a continuous one."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(gen.temperature)])
    if gen.top_k:
        warpers.append(TopKLogitsWarper(gen.top_k))
    if gen.top_p < 1.0:
        warpers.append(TopPLogitsWarper(gen.top_p))
    return warpers


class PerRowSampler:
    """Samples each row from its own seeded generator, then forces that token (generation runs
    greedy), so a row's sampled text does not depend on which rows share its batch."""

    def __init__(self, gen: GenerationConfig, seeds: list[int], device):
        import torch

        self.warpers = sampling_warpers(gen)
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(self.warpers(input_ids, scores.float()), dim=-1)
        forced = torch.full_like(scores, float("-inf"))
        for row, g in enumerate(self.generators):
            forced[row, torch.multinomial(probs[row], 1, generator=g)] = 0.0
        return forced


class RowSampler:
    """One row's next token in continuous batching: greedy (the argmax, as generate takes it), or
    sampled from the row's own seeded generator after the same warpers as PerRowSampler, one draw per
    step: the tokens PerRowSampler gives that row in a static batch."""

    def __init__(self, gen: GenerationConfig, seed: int, device):
        import torch
        from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

        # transformers' own loop-fighting processors, before the warpers, as generate applies them
        self.processors = LogitsProcessorList()
        if gen.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
        if gen.no_repeat_ngram_size:
            self.processors.append(NoRepeatNGramLogitsProcessor(gen.no_repeat_ngram_size))
        self.sample = gen.temperature > 0
        if self.sample:
            self.warpers = sampling_warpers(gen)
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, row, logits) -> int:
        """logits: (vocab,) float32 of this row's last position."""
        import torch

        if not self.sample and not self.processors:
            return int(logits.argmax())
        ids = torch.tensor([list(row.inputs["input_ids"]) + row.tokens], device=logits.device)
        scores = self.processors(ids, logits[None]) if self.processors else logits[None]
        if not self.sample:
            return int(scores[0].argmax())
        probs = torch.softmax(self.warpers(ids, scores), dim=-1)[0]
        return int(torch.multinomial(probs, 1, generator=self.generator))
