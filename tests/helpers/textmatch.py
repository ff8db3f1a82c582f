"""When two generations of a random-weight checkpoint count as the same (tests and GPU checks).

Random weights put near-ties between the top logits. Another CPU's kernels, another thread count
or another batch shape move the logits by about 1e-5 and can flip such a tie; from there the two
texts go separate ways, although neither side did anything wrong. Exact text equality therefore
fails on some machines and passes on others.

The rule: a generation matches the reference (transformers' own `generate` on the same model inputs,
one row at a time, greedy) when its text is equal, or when, at the first step where the two part,
the reference's own logits rank the token the other side took within TOLERANCE of the token the
reference took: a tie the reference itself cannot tell apart at that precision. What follows such
a tie is not compared. A real fault (right padding instead of left, features at the wrong offset,
another prompt) moves logits by far more than TOLERANCE (tests/test_textmatch.py proves that the
rule catches them).

TOLERANCE is 1e-3 on logits whose spread is about 2-3 (the tiny checkpoints' widened weights):
100x the run-to-run noise measured between batch shapes, thread counts and tensor-parallel ranks
(<= 1e-5), and 100x below the typical gap between the top two logits (about 0.1-0.3), so a broken
variant's divergence lands within it only by a rare chance, on one row out of hundreds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOLERANCE = 1e-3


@dataclass
class Reference:
    text: str
    token_ids: list[int]
    scores: list  # one 1-D logits tensor per generated step


def reference_generation(model, tokenizer, inputs: dict[str, np.ndarray], max_new_tokens: int, **generate_kwargs) -> Reference:
    """transformers' generate on one row's processor outputs (no batching, no feature cache), greedy,
    with the logits of every step."""
    import torch

    # the rows' arrays lack the batch dimension where the processor's have it (pipeline.model.preprocess)
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    for k in ("input_ids", "pixel_values_videos"):
        if k in batch:
            batch[k] = batch[k][None]
    if "image_sizes" in batch:  # OneVision: (images, patches, C, H, W), several images untiled
        batch["batch_num_images"] = torch.tensor([batch["pixel_values"].shape[0]])
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return generate_reference(model, tokenizer, batch, max_new_tokens, **generate_kwargs)


def generate_reference(model, tokenizer, batch: dict, max_new_tokens: int, **generate_kwargs) -> Reference:
    """Greedy `generate` on one row's processor outputs (tensors, batch dimension 1), with the logits of
    every step (after generate's own processors: `generate_kwargs` such as repetition_penalty)."""
    import torch

    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=model.generation_config.pad_token_id,
                             **generate_kwargs)
    ids = out.sequences[0, batch["input_ids"].shape[1]:].tolist()
    eos = _eos_ids(model, tokenizer)
    end = next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))
    return Reference(tokenizer.decode(ids[:end], skip_special_tokens=True), ids[:end],
                     [s[0].float() for s in out.scores[:end]])


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos if isinstance(eos, list) else [eos])


def _text(tokenizer, ids: list[int]) -> str:
    # a byte-level token may end inside a UTF-8 character: drop the replacement character it shows as
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def difference(ref: Reference, tokenizer, got: str, tolerance: float = TOLERANCE) -> str | None:
    """None when `got` matches the reference under the rule above, else what differs and by how much."""
    if got == ref.text:
        return None
    for step, (token, logits) in enumerate(zip(ref.token_ids, ref.scores)):
        prefix = ref.token_ids[:step]
        if got.startswith(_text(tokenizer, prefix + [token])) and step + 1 < len(ref.token_ids):
            continue  # still on the reference's path
        # the other side parted here: which tokens could it have taken, and how close were they?
        top = float(logits[token])
        close = (logits >= top - tolerance).nonzero().flatten().tolist()
        for alt in close:
            if alt == token:
                continue
            alt_text = _text(tokenizer, prefix + [alt])
            if got.startswith(alt_text) or alt_text.startswith(got):
                return None  # a tie the reference cannot tell apart: what follows is not compared
        gap = top - float(logits.topk(2).values[1])
        return (f"parted from the reference at step {step} after {_text(tokenizer, prefix)!r}: reference "
                f"{ref.text!r}, got {got!r}; no token within {tolerance:g} of the reference's "
                f"(top-two gap {gap:.2e}) explains the other text")
    return f"got {got!r}, reference {ref.text!r}"


def references(model, tokenizer, requests: list[dict], max_new_tokens: int) -> dict[tuple, Reference]:
    """The reference generation of each preprocessed row (the Preprocess stage's output), by (id, prompt)."""
    from pipeline.batch.stages import unpack

    return {(r["id"], r["prompt"]): reference_generation(model, tokenizer, unpack(r["model_inputs"]), max_new_tokens)
            for r in requests}


def mismatches(refs: dict[tuple, Reference], tokenizer, texts: dict[tuple, str],
               tolerance: float = TOLERANCE) -> dict[tuple, str]:
    """The rows whose text does not match its reference, with why; {} when all match."""
    assert texts.keys() == refs.keys(), (sorted(texts.keys() - refs.keys()), sorted(refs.keys() - texts.keys()))
    found = {key: difference(refs[key], tokenizer, text, tolerance) for key, text in texts.items()}
    return {key: why for key, why in found.items() if why is not None}
