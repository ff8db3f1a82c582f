"""Read + validate the manifest: files under a URI -> one record per item, invalid rows as error records.

Validation happens on the driver while the manifest is scanned: rows are small, the scan keeps
the file and line of every row for error messages, and duplicate ids need one global view.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from pipeline import schemas
from pipeline.config import RunConfig
from pipeline.storage import filesystem, protocol_of

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")

RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("uris", pa.list_(pa.string())),
        ("media_type", pa.string()),
        ("prompt", pa.string()),
        ("questions", pa.list_(pa.string())),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("error_type", pa.string()),
        ("error", pa.string()),
        ("done_prompts", pa.list_(pa.string())),  # prompts of this item already committed (set by the run)
    ]
)


class ManifestError(Exception):
    """The manifest as a whole cannot be read: the run cannot start."""


@dataclass
class ManifestScan:
    records: pa.Table
    files: list[str]

    @property
    def num_items(self) -> int:
        return self.records.num_rows


def manifest_format(path: str) -> str | None:
    name = path.lower()
    for comp in COMPRESSIONS:
        name = name.removesuffix(comp)
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def list_manifest_files(uri: str, cfg: RunConfig) -> list[str]:
    """The manifest file itself, or every manifest file under a prefix (sorted, hidden files skipped)."""
    fs, path = filesystem(uri, cfg.storage)
    if not fs.exists(path):
        raise ManifestError(f"manifest not found: {uri} (check the path, and for s3:// the bucket, endpoint and credentials)")
    proto = protocol_of(uri)
    if fs.isfile(path):
        if manifest_format(path) is None:
            raise ManifestError(f"cannot tell the format of {uri}: name it .jsonl, .csv or .parquet (optionally .gz)")
        # a local manifest by its absolute path: relative media paths in it resolve beside it wherever
        # the run's working directory is
        return [path if proto == "file" else uri]
    found = []
    for p in sorted(fs.find(path)):
        name = p.rsplit("/", 1)[-1]
        if name.startswith((".", "_")) or manifest_format(p) is None:
            continue
        found.append(p if proto == "file" else f"{proto}://{p}")
    if not found:
        raise ManifestError(f"no manifest files (.jsonl, .csv, .parquet) under {uri}")
    return found


def _iter_raw_rows(uri: str, cfg: RunConfig) -> Iterator[tuple[str, dict | Exception]]:
    """(source, row) for every row of one file; a row that cannot be parsed comes as an exception."""
    from fsspec.core import OpenFile
    from fsspec.utils import infer_compression

    fmt = manifest_format(uri)
    fs, path = filesystem(uri, cfg.storage)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            n = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    n += 1
                    yield f"{uri}:row {n}", row
        return
    # utf-8-sig: spreadsheet programs start CSV (and some editors JSONL) with a byte-order mark
    with OpenFile(fs, path, "rt", compression=infer_compression(path), encoding="utf-8-sig", newline="") as f:
        if fmt == "csv":
            for n, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                yield f"{uri}:line {n}", _coerce_csv_row(row)
            return
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                yield f"{uri}:line {n}", row
            except ValueError as e:
                yield f"{uri}:line {n}", e


def _coerce_csv_row(row: dict) -> dict:
    """CSV cells are strings: empty means absent, numbers and the questions list are parsed."""
    out = {}
    for key, value in row.items():
        if key is None or value is None or value == "":
            continue
        if key in ("start_s", "end_s"):
            try:
                value = float(value)
            except ValueError:
                pass  # left as a string so validation names the column
        elif key in ("questions", "uris"):
            try:
                value = json.loads(value) if value.lstrip().startswith("[") else [value]
            except ValueError:
                pass
        out[key] = value
    return out


def _normalize(row: dict) -> dict:
    """Drop nulls and NaNs (Parquet/pandas write them for absent values); integer ids become strings."""
    out = {}
    for key, value in row.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if key == "id" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        out[key] = value
    return out


def validate_row(row: dict) -> str | None:
    """None when the row is valid, else a message naming what to fix."""
    errors = sorted(schemas.manifest_validator().iter_errors(row), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        if e.validator == "oneOf" and not e.path:  # the schema's "uri or uris": say it in words
            return ("give 'uri' (one media file) or 'uris' (several images), not both" if "uri" in row and "uris" in row
                    else "missing 'uri' (one media file) or 'uris' (several images)")
        where = f"column '{e.path[0]}': " if e.path else ""
        return f"{where}{e.message}"
    if "uris" in row and row.get("media_type", "image") != "image":
        return "a row with 'uris' holds images: drop media_type or set it to image"
    start, end = row.get("start_s"), row.get("end_s")
    if start is not None and end is not None and end <= start:
        return f"end_s ({end}) must be greater than start_s ({start})"
    return None


def _resolve_relative(media_uri: str, manifest_file: str) -> str:
    """A relative path in a manifest names a file beside the manifest (in the same folder or prefix)."""
    if ":" in media_uri or media_uri.startswith("/"):
        return media_uri
    return manifest_file.rsplit("/", 1)[0] + "/" + media_uri


def _record(row: dict, source: str, error: str | None = None, error_type: str | None = None) -> dict:
    rec = {name: None for name in RECORD_SCHEMA.names}
    if error is None:
        rec.update({k: row.get(k) for k in ("id", "uri", "uris", "media_type", "prompt", "questions", "start_s", "end_s")})
        rec["status"] = "ok"
    else:
        rid, uri, uris = row.get("id"), row.get("uri"), row.get("uris")
        rec.update(id=rid if isinstance(rid, str) else None, uri=uri if isinstance(uri, str) else None,
                   uris=uris if isinstance(uris, list) and all(isinstance(u, str) for u in uris) else None)
        rec.update(status="error", error_type=error_type or "invalid_manifest_row",
                   error=f"{source}: {error}. Fix this manifest row and rerun.")
    rec["source"] = source
    return rec


def scan_manifest(cfg: RunConfig) -> ManifestScan:
    """Read every manifest row; invalid rows and repeated ids become error records (never a crash).

    Duplicate-id policy: the first occurrence of an id is processed; every later row with that id
    becomes an error record of type `duplicate_id` (with no prompt), so nothing disappears silently.
    """
    from pipeline.urls import URLRejected, check_media_uri

    files = list_manifest_files(cfg.manifest, cfg)
    prefixes = cfg.media_prefixes()
    records, seen = [], set()
    for uri in files:
        try:
            for source, row in _iter_raw_rows(uri, cfg):
                if isinstance(row, Exception):
                    records.append(_record({}, source, f"not valid JSON ({row})"))
                    continue
                row = _normalize(row)
                problem = validate_row(row)
                if not problem and cfg.task == "qa" and not (row.get("questions") or row.get("prompt") or cfg.prompt):
                    problem = "--task qa needs questions: add a 'questions' list (or a 'prompt') to the row, or pass --prompt"
                if problem:
                    records.append(_record(row, source, problem))
                    continue
                if "uris" in row:
                    row["uris"] = [_resolve_relative(u, uri) for u in row["uris"]]
                else:
                    row["uri"] = _resolve_relative(row["uri"], uri)
                try:
                    for media in row.get("uris") or [row["uri"]]:
                        check_media_uri(media, prefixes)
                except URLRejected as e:
                    problem = (f"uri {media!r} is not allowed: {e}; if this source is trusted, "
                               "pass --allow-uri-prefix with its prefix")
                    records.append(_record(row, source, problem, "uri_not_allowed"))
                    seen.add(row["id"])  # its id is taken: a later row with it is a duplicate
                    continue
                if row["id"] in seen:
                    records.append(_record(row, source, f"id {row['id']!r} appeared earlier in the manifest; "
                                           "only its first row is processed", "duplicate_id"))
                else:
                    seen.add(row["id"])
                    records.append(_record(row, source))
        except (OSError, UnicodeDecodeError, pa.ArrowInvalid, csv.Error) as e:
            raise ManifestError(f"cannot read manifest file {uri}: {e}") from e
    return ManifestScan(pa.Table.from_pylist(records, schema=RECORD_SCHEMA), files)


def prompts_for(record: dict, media_type: str | None, cfg: RunConfig) -> list[str | None]:
    """The prompts of one item: its questions (qa), else its own prompt, else the run's default.
    A row that is not an item (invalid, or a repeated id) has one output row, without a prompt."""
    if record["error_type"] in ("invalid_manifest_row", "duplicate_id"):
        return [None]
    if cfg.task == "qa" and record.get("questions"):
        return list(record["questions"])
    kind = "images" if len(record.get("uris") or []) > 1 else media_type or record.get("media_type")
    return [record.get("prompt") or cfg.default_prompt(kind)]
