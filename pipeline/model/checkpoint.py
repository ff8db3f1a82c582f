"""Where a model's files are: a hub id, a local folder, or an object-store prefix copied to local disk.

An object-store model is copied into the node's cache (PIPELINE_MODEL_CACHE):

    CACHE/by-uri/<hash of the URI>/weights-<hash of the listing>/     every file (model actors)
    CACHE/by-uri/<hash of the URI>/processor-<hash of the listing>/   all but the weights (CPU stages)

The listing hash covers each file's path, size and version (ETag, or the object version where the
store has one), so a file re-uploaded under the same prefix gives a new folder that is fetched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from pipeline.config import StorageConfig
from pipeline.io.storage import filesystem, join, protocol_of

CACHE_DIR = Path(os.environ.get("PIPELINE_MODEL_CACHE", Path.home() / ".cache" / "pipeline" / "models"))
# Weight files: what a processor and a tokenizer never read (the rest of a checkpoint is small).
# The file a random-weight checkpoint carries (pipeline.testing.tiny_model writes it): its text is noise.
MARKER = "RANDOM_WEIGHTS.txt"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
COPY_ATTEMPTS = 3  # copies made again when an object changes while it is copied


def local_checkpoint(model: str, storage: StorageConfig, weights: bool = True) -> str:
    """A path or hub id that transformers' from_pretrained can load.

    Object-store prefixes (s3://, gs://, ...) are copied into the node's cache, with their weights
    (`weights=True`: model actors) or without them (the processor and tokenizer files: CPU stages
    and the Serve ingress). One copy per node and listing: the copy is made under a file lock, so
    the actors of one node share it, and renamed into place only when complete, so a crash never
    leaves a half checkpoint that looks whole.
    """
    if protocol_of(model) == "file":
        return model.removeprefix("file://")  # a local folder, or a hub id (from_pretrained tells which)
    import fcntl

    fs, root = filesystem(model, storage)
    kind = "weights" if weights else "processor"
    base = CACHE_DIR / "by-uri" / hashlib.sha256(model.rstrip("/").encode()).hexdigest()[:16]
    for _ in range(COPY_ATTEMPTS):
        files = listing(fs, root, weights)
        if "config.json" not in files:
            raise FileNotFoundError(f"{model} holds no config.json: is it a transformers checkpoint?")
        target = base / f"{kind}-{_digest(files)}"
        if target.is_dir():
            return str(target)
        base.mkdir(parents=True, exist_ok=True)
        with open(base / f"{kind}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.is_dir():
                return str(target)
            for stale in base.glob(f".partial-{kind}-*"):  # left by a copy that crashed (the lock is ours)
                shutil.rmtree(stale, ignore_errors=True)
            partial = base / f".partial-{kind}-{os.getpid()}"
            names = sorted(files)
            for name in names:
                (partial / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get([join(root, n) for n in names], [str(partial / n) for n in names])
            if listing(fs, root, weights) != files:  # re-uploaded while copied: the copy may mix versions
                shutil.rmtree(partial, ignore_errors=True)
                continue
            partial.rename(target)
            _drop_older_copies(base, kind, keep=target)
        return str(target)
    raise RuntimeError(f"{model} changed during each of {COPY_ATTEMPTS} copies; wait for its upload to finish")


def listing(fs, root: str, weights: bool) -> dict[str, str]:
    """{path under the prefix: size and version} of the checkpoint's files (no weights unless asked)."""
    fs.invalidate_cache()  # a listing cached by this process would hide a re-upload
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    return {path[len(root) + 1:]: _version(info) for path, info in found.items()
            if info.get("type", "file") == "file" and (weights or not path.endswith(WEIGHT_SUFFIXES))}


def _version(info: dict) -> str:
    """What changes when an object is written again: its version id or ETag (S3), generation (GCS)."""
    tag = next((info[k] for k in ("VersionId", "ETag", "etag", "generation", "md5Hash") if info.get(k)), "")
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated") or ""
    return f"{info.get('size')}:{tag}:{modified}"


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:16]


def _drop_older_copies(base: Path, kind: str, keep: Path) -> None:
    """Copies of earlier versions of the same prefix: a new 72B copy must not sit beside the old one.
    Actors that loaded an old copy keep their open files (a removed file stays readable)."""
    for old in base.glob(f"{kind}-*"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def is_random_weight(path: str) -> bool:
    """True for checkpoints marked as random-weight (pipeline.testing.tiny_model writes the marker)."""
    return (Path(path) / MARKER).exists()
