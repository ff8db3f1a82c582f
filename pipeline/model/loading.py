"""Load a checkpoint's parts safely: safetensors weights only, no remote code unless asked, a pinned revision.

Every from_pretrained (config, model, tokenizer, processor) goes through here, so the model, its
tokenizer and its processor always come from the same revision under the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ModelLoadError(Exception):
    """The model cannot be loaded as configured; the message says what to do."""


@dataclass(frozen=True)
class LoadOptions:
    revision: str | None = None  # hub branch, tag or commit; None: the hub's default branch
    trust_remote_code: bool = False  # run Python code shipped with the checkpoint (auto_map)

    def kwargs(self, path: str) -> dict:
        """Keyword arguments for every from_pretrained of the checkpoint at `path`."""
        if self.revision and Path(path).is_dir():
            raise ModelLoadError(f"--revision {self.revision} was given but the model is a folder ({path}: a local "
                                 "model or the node's copy of an s3:// one); revisions select versions of hub ids: "
                                 "drop --revision, or point --model at the copy of the wanted version")
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}


def load_config(path: str, options: LoadOptions):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, **options.kwargs(path))


def load_processor(path: str, options: LoadOptions):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, **options.kwargs(path))


def load_tokenizer(path: str, options: LoadOptions):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **options.kwargs(path))


def quantization_config(quantization: str | None, device, dtype):
    """bitsandbytes settings for --quantization 4bit|8bit; a clear error where it cannot run."""
    if quantization is None:
        return None
    import importlib.util

    if device.type != "cuda":
        raise ModelLoadError(f"--quantization {quantization} needs a CUDA GPU (bitsandbytes), but the model runs "
                             f"on {device.type}: run on GPU nodes (--device cuda) or drop --quantization")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"--quantization {quantization} needs the bitsandbytes package: "
                             "pip install 'pipeline[quantization]' (or bitsandbytes) on the model nodes")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(path: str, options: LoadOptions, *, device, dtype, attn_implementation: str = "sdpa",
               quantization: str | None = None, tp: int = 1):
    """The image-text-to-text model on `device`, in eval mode, from safetensors weights only.
    With tp > 1 this process is one rank of a tensor-parallel replica: transformers shards the
    weights (tp_plan "auto") and places them on this rank's device."""
    from transformers import AutoModelForImageTextToText

    quant = quantization_config(quantization, device, dtype)
    placement = {"quantization_config": quant, "device_map": {"": device}} if quant else {}
    if tp > 1:
        from transformers.distributed import DistributedConfig

        placement["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=tp)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
            **placement, **options.kwargs(path))
    except OSError as e:
        if "safetensors" not in str(e):
            raise
        # Pickled .bin weights can run code when loaded: never loaded here.
        where = f"{path} at revision {options.revision}" if options.revision else path
        raise ModelLoadError(
            f"{where} has no safetensors weights (model.safetensors or its shards); only safetensors are loaded, "
            "because pickled .bin weights can run code. Use a revision or copy that has safetensors, or convert "
            "the checkpoint once in a trusted place (from_pretrained(...).save_pretrained(DIR) writes "
            "safetensors) and point --model at DIR") from e
    except ImportError as e:
        if attn_implementation == "flash_attention_2":
            raise ModelLoadError(f"--attn-implementation flash_attention_2 cannot run here ({e}); it needs a CUDA GPU "
                                 "and the flash-attn package: install it on the model nodes or use sdpa") from e
        raise
    return (model if quant or tp > 1 else model.to(device)).eval()
