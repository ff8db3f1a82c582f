"""Where a model's files are: a hub id, a local folder, or an object-store prefix copied to local disk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.config import StorageConfig
from pipeline.storage import filesystem, protocol_of

CACHE_DIR = Path(os.environ.get("PIPELINE_MODEL_CACHE", Path.home() / ".cache" / "pipeline" / "models"))


def local_checkpoint(model: str, storage: StorageConfig) -> str:
    """A path or hub id that transformers' from_pretrained can load.

    Object-store prefixes (s3://, gs://, ...) are copied once into the node's cache, under a file
    lock so that the actors of one node share one copy; the copy is renamed into place only when
    complete, so a crash never leaves a half checkpoint that looks whole.
    """
    proto = protocol_of(model)
    if proto == "file":
        path = model.removeprefix("file://")
        return path  # a local folder, or a hub id (from_pretrained tells which)
    import fcntl

    target = CACHE_DIR / hashlib.sha256(model.rstrip("/").encode()).hexdigest()[:16]
    if target.is_dir():
        return str(target)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            fs, path = filesystem(model, storage)
            partial = Path(f"{target}.partial-{os.getpid()}")
            fs.get(path.rstrip("/") + "/", str(partial), recursive=True)
            if not (partial / "config.json").exists():
                raise FileNotFoundError(f"{model} holds no config.json: is it a transformers checkpoint?")
            partial.rename(target)
    return str(target)


def is_random_weight(path: str) -> bool:
    """True for checkpoints written by pipeline.testing.tiny_model (their text is noise)."""
    from pipeline.testing.tiny_model import MARKER

    return (Path(path) / MARKER).exists()
