"""Model loading: safetensors only, no checkpoint code unless --trust-remote-code, a pinned --revision
reaching the model, tokenizer and processor alike, and clear errors for options that cannot run here."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.config import GenerationConfig, RunConfig
from pipeline.model.engine import Engine
from pipeline.model.loading import ModelLoadError, quantization_config
from pipeline.model.preprocess import Preprocessor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = (np.random.RandomState(0).rand(30, 50, 3) * 255).astype(np.uint8)


def test_only_safetensors_weights_are_loaded(tiny_model, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no safetensors weights") as e:
        Engine(str(pickled), device="cpu")
    assert "save_pretrained" in str(e.value)  # says what to do


REMOTE_CODE = textwrap.dedent("""
    import os
    from pathlib import Path

    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    Path(os.environ["REMOTE_CODE_MARKER"]).write_text("the checkpoint's code ran")


    class CustomLlava(LlavaOnevisionForConditionalGeneration):
        pass


    class CustomProcessor(LlavaOnevisionProcessor):
        pass
""")


@pytest.fixture
def remote_code_checkpoint(tiny_model, tmp_path, monkeypatch):
    path = tmp_path / "with-code"
    shutil.copytree(tiny_model, path)
    (path / "custom_llava.py").write_text(REMOTE_CODE)
    for name, auto in [("config.json", {"AutoModelForImageTextToText": "custom_llava.CustomLlava"}),
                       ("processor_config.json", {"AutoProcessor": "custom_llava.CustomProcessor"})]:
        data = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({**data, "auto_map": auto}))
    marker = tmp_path / "marker"
    monkeypatch.setenv("REMOTE_CODE_MARKER", str(marker))
    return path, marker


def test_checkpoint_code_runs_only_with_trust_remote_code(remote_code_checkpoint):
    path, marker = remote_code_checkpoint
    engine = Engine(str(path), device="cpu")
    pre = Preprocessor(str(path))
    assert not marker.exists()  # transformers' own classes were used
    assert type(engine.model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert type(pre.processor).__name__ == "LlavaOnevisionProcessor"
    assert engine.generate([pre.build("image", IMAGE[None], "What is it?")], GenerationConfig(max_new_tokens=4))[0].text

    engine = Engine(str(path), device="cpu", trust_remote_code=True)
    pre = Preprocessor(str(path), trust_remote_code=True)
    assert marker.exists()
    assert type(engine.model).__name__ == "CustomLlava"
    assert type(pre.processor).__name__ == "CustomProcessor"


PINNED = "1" * 40
MAIN = "2" * 40


def test_revision_selects_model_tokenizer_and_processor(tiny_checkpoint, tmp_path):
    """A hub cache (offline) whose main branch holds an Interleave checkpoint and whose pinned commit
    holds a OneVision one: --revision must reach every from_pretrained, or the parts would mix."""
    repo = tmp_path / "hub" / "models--acme--llava-tiny"
    shutil.copytree(tiny_checkpoint("llava_interleave"), repo / "snapshots" / MAIN)
    shutil.copytree(tiny_checkpoint("llava_onevision"), repo / "snapshots" / PINNED)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from pipeline.config import GenerationConfig
        from pipeline.model.engine import Engine
        from pipeline.model.preprocess import Preprocessor
        out = {{}}
        for name, revision in [("main", None), ("pinned", "{PINNED}")]:
            engine = Engine("acme/llava-tiny", device="cpu", revision=revision)
            pre = Preprocessor("acme/llava-tiny", revision=revision)
            video = (np.random.RandomState(0).rand(2, 24, 24, 3) * 255).astype(np.uint8)
            text = engine.generate([pre.build("video", video, "What happens?")], GenerationConfig(max_new_tokens=3))[0].text
            out[name] = {{"model": engine.family.name, "config": pre.family.name,
                         "tokenizer_has_video_token": "<video>" in engine.tokenizer.get_vocab(),
                         "processor": type(pre.processor).__name__, "generated": bool(text)}}
        json.dump(out, sys.stdout)
    """)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["main"] == {"model": "llava_interleave", "config": "llava_interleave", "tokenizer_has_video_token": False,
                           "processor": "LlavaProcessor", "generated": True}
    assert out["pinned"] == {"model": "llava_onevision", "config": "llava_onevision", "tokenizer_has_video_token": True,
                             "processor": "LlavaOnevisionProcessor", "generated": True}


def test_revision_of_a_local_folder_is_refused(tiny_model):
    with pytest.raises(ModelLoadError, match="revisions select versions of hub ids"):
        Preprocessor(str(tiny_model), revision="v1")


def test_quantization_says_why_it_cannot_run(tiny_model):
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        Engine(str(tiny_model), device="cpu", quantization="4bit")
    if importlib.util.find_spec("bitsandbytes") is None:  # the package check comes after the device check
        with pytest.raises(ModelLoadError, match="bitsandbytes package"):
            quantization_config("8bit", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValidationError, match="needs a CUDA GPU"):
        RunConfig(manifest="m.jsonl", output="out", model="m", device="cpu", quantization="8bit")


def test_attention_implementations(tiny_model):
    pre = Preprocessor(str(tiny_model))
    inputs = [pre.build("image", IMAGE[None], "What is it?"), pre.build("video", np.stack([IMAGE] * 3), "And this?")]
    gen = GenerationConfig(max_new_tokens=8)
    sdpa = [r.text for r in Engine(str(tiny_model), device="cpu", attn_implementation="sdpa").generate(inputs, gen)]
    eager = [r.text for r in Engine(str(tiny_model), device="cpu", attn_implementation="eager").generate(inputs, gen)]
    assert sdpa == eager
    with pytest.raises(ModelLoadError, match="flash-attn"):
        Engine(str(tiny_model), device="cpu", attn_implementation="flash_attention_2")
    with pytest.raises(ValidationError):
        RunConfig(manifest="m.jsonl", output="out", model="m", attn_implementation="flash")


def test_job_flags_reach_the_config():
    from jobs import caption_videos

    cfg = caption_videos.parse_args(["--manifest", "m.jsonl", "--output", "out", "--model", "acme/llava",
                                     "--revision", PINNED, "--trust-remote-code", "--quantization", "4bit",
                                     "--attn-implementation", "eager", "--dtype", "float16"])
    assert (cfg.revision, cfg.trust_remote_code, cfg.quantization, cfg.attn_implementation, cfg.dtype) == (
        PINNED, True, "4bit", "eager", "float16")
    assert caption_videos.parse_args(["--manifest", "m", "--output", "o", "--model", "m"]).trust_remote_code is False
    with pytest.raises(SystemExit):
        caption_videos.parse_args(["--manifest", "m", "--output", "o", "--model", "m", "--quantization", "8bit",
                                   "--device", "cpu"])
