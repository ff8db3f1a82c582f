"""Read + validate the manifest: files under a URI -> one record per item, invalid rows as error records.

A file is read in chunks (JSONL: blocks of whole lines; CSV, Parquet: record batches), each chunk
parsed and checked for the whole table at once with pyarrow: nearly every row of a real manifest
is plain, and the rows that are not (bad JSON, a wrong type, a URI that needs a closer look) go
through the per-row functions below, which also word the message. Every record keeps its file and
line (`source`, and `_order` for the manifest's order). A run reads the files in Ray tasks and
finds repeated ids by id partition (pipeline/planning/plan.py); scan_manifest does the same in one
process, for small manifests and tests.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import pyarrow as pa

from pipeline import schemas
from pipeline.config import CaptionConfig, RunConfig
from pipeline.io.storage import filesystem, protocol_of
from pipeline.io.urls import media_prefixes

if TYPE_CHECKING:
    import numpy as np

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
        # the prompts still to do (own_prompts; the run's plan leaves out those committed): null where the
        # item takes the run's default prompt, which the decode stage picks for the media type it finds
        ("prompts", pa.list_(pa.string())),
        ("retry_prompts", pa.list_(pa.string())),  # of its prompts to do, those redoing flagged rows (--retry-flagged)
    ]
)


class ManifestError(Exception):
    """The manifest as a whole cannot be read: the run cannot start."""


@dataclass
class ManifestScan:
    records: pa.Table
    files: list[str]
    prefixes: list[str]  # where the records' media may be (the decode stage checks again once a file is open)

    @property
    def num_items(self) -> int:
        return self.records.num_rows


def manifest_format(path: str) -> str | None:
    name = path.lower()
    for comp in COMPRESSIONS:
        name = name.removesuffix(comp)
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def list_manifest_files(uri: str, cfg: RunConfig) -> list[str]:
    """The manifest file itself, or every manifest file under a prefix (sorted; files and folders whose
    names start with `.` or `_` are skipped: .git/, _temporary/, _runs/ hold no manifests)."""
    return list(manifest_file_sizes(uri, cfg))


def manifest_file_sizes(uri: str, cfg: RunConfig) -> dict[str, int]:
    """{manifest file: bytes}, as list_manifest_files lists them (one listing of the prefix)."""
    fs, path = filesystem(uri, cfg.storage)
    if not fs.exists(path):
        raise ManifestError(f"manifest not found: {uri} (check the path, and for s3:// the bucket, endpoint and credentials)")
    proto = protocol_of(uri)
    if fs.isfile(path):
        if manifest_format(path) is None:
            raise ManifestError(f"cannot tell the format of {uri}: name it .jsonl, .csv or .parquet (optionally .gz)")
        # a local manifest by its absolute path: relative media paths in it resolve beside it wherever
        # the run's working directory is
        return {path if proto == "file" else uri: fs.size(path)}
    found, root = {}, path.rstrip("/") + "/"
    for p, info in sorted(fs.find(path, detail=True).items()):
        under = p[len(root):] if p.startswith(root) else p.rsplit("/", 1)[-1]
        if any(part.startswith((".", "_")) for part in under.split("/")) or manifest_format(p) is None:
            continue
        found[p if proto == "file" else f"{proto}://{p}"] = info.get("size") or 0
    if not found:
        raise ManifestError(f"no manifest files (.jsonl, .csv, .parquet) under {uri}")
    return found


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
            except (ValueError, RecursionError):
                pass  # left as it is so validation names the column
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
        if e.validator == "maxItems":  # jsonschema's message repeats the whole list
            return f"{where}{len(e.instance):,} items, more than the {e.validator_value} a row may hold; split the row"
        return f"{where}{e.message}"
    if "uris" in row and row.get("media_type", "image") != "image":
        return "a row with 'uris' holds images: drop media_type or set it to image"
    start, end = row.get("start_s"), row.get("end_s")
    if start is not None and end is not None and end <= start:
        return f"end_s ({end}) must be greater than start_s ({start})"
    return None


def _resolve_relative(media_uri: str, manifest_file: str | None) -> str:
    """A relative path in a manifest names a file beside the manifest (in the same folder or prefix);
    rows with no manifest (pipeline.caption) keep it, and the URI rules refuse it."""
    if manifest_file is None or ":" in media_uri or media_uri.startswith("/"):
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
        # a row of a user's Dataset (pipeline.caption) has no file and line: it is named by its id
        where = source or ("input row" + (f" {rid!r}" if isinstance(rid, str) else ""))
        rec.update(status="error", error_type=error_type or "invalid_manifest_row",
                   error=f"{where}: {error}. Fix this {'manifest ' if source else ''}row and rerun.")
    rec["source"] = source
    return rec


MANIFEST_COLUMNS = ["id", "uri", "uris", "media_type", "prompt", "questions", "start_s", "end_s"]
RAW_SCHEMA = pa.schema([RECORD_SCHEMA.field(c) for c in MANIFEST_COLUMNS])
# `_order`: file index << ROW_BITS | line (or row) number, the manifest's order across files
SCAN_SCHEMA = RECORD_SCHEMA.append(pa.field("_order", pa.int64()))
ROW_BITS = 40
SCAN_CHUNK_BYTES = 4 << 20  # JSONL bytes (CSV block) parsed at once: bounds a scan task's memory on a huge file
SCAN_BATCH_ROWS = 50_000  # Parquet rows parsed at once
# Longest JSONL line read as a row (a row with 10,000 questions is ~1 MB): a longer one is an error
# row read past without being held (a 128 MB line without a newline cost ~10x its size in memory).
MAX_LINE_BYTES = 16 << 20


@dataclass
class Chunk:
    """Rows of one manifest file, parsed by pyarrow (`table`) or, where pyarrow could not parse
    them, one by one as before (`rows`: a dict, or the reason the row is not one); `numbers`:
    each row's line (Parquet: row) number."""

    numbers: "np.ndarray"
    table: pa.Table | None = None
    rows: list | None = None
    reread: Callable[[list[int]], list] | None = None  # the table's rows at these positions, as the per-row path reads them


def _file_chunks(uri: str, fmt: str, cfg: RunConfig) -> Iterator[Chunk]:
    from fsspec.core import OpenFile
    from fsspec.utils import infer_compression

    fs, path = filesystem(uri, cfg.storage)

    def open_binary():
        return OpenFile(fs, path, "rb", compression=infer_compression(path))

    if fmt == "parquet":
        yield from _parquet_chunks(open_binary)
    elif fmt == "csv":
        yield from _csv_chunks(open_binary)
    else:
        yield from _jsonl_chunks(open_binary)


def _parquet_chunks(open_binary) -> Iterator[Chunk]:
    import numpy as np
    import pyarrow.parquet as pq

    with open_binary() as f:
        pf = pq.ParquetFile(f)
        columns = [c for c in MANIFEST_COLUMNS if c in pf.schema_arrow.names]
        n = 1
        for batch in pf.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=columns):
            yield Chunk(np.arange(n, n + batch.num_rows), table=pa.Table.from_batches([batch]))
            n += batch.num_rows


def _jsonl_chunks(open_binary) -> Iterator[Chunk]:
    """Blocks of whole lines; the byte-order mark some editors write is dropped; a line longer than
    MAX_LINE_BYTES is skipped to its end (never held whole) and becomes one error row."""
    import numpy as np

    line, carry, skipping = 1, b"", False
    with open_binary() as f:
        first = True
        while True:
            block = f.read(SCAN_CHUNK_BYTES)
            if first:
                block, first = block.removeprefix(b"\xef\xbb\xbf"), False
            if skipping:  # inside an overlong line: drop bytes up to its newline
                newline = block.find(b"\n")
                if newline < 0 and block:
                    continue
                yield Chunk(np.array([line]), rows=[ValueError(
                    f"the line is longer than {MAX_LINE_BYTES >> 20} MB, more than any manifest row needs; "
                    "split it, or list the media of a huge row in several rows")])
                line, skipping = line + 1, False
                if newline < 0:
                    return
                block = block[newline + 1:]
                if not block:
                    continue
            data = carry + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if cut:
                yield from _jsonl_chunk(data[:cut], line)
                line += data.count(b"\n", 0, cut)
            carry = data[cut:]
            if len(carry) > MAX_LINE_BYTES:
                carry, skipping = b"", True
            if not block:
                return


def _jsonl_chunk(data: bytes, first_line: int) -> Iterator[Chunk]:
    """The non-blank lines of a block of whole lines, parsed by pyarrow where that is certain to
    give one row per line (each starts with `{` and ends with `}`: pyarrow would also take two
    objects on a line, or one over two lines), else line by line with json."""
    import numpy as np

    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == 10)
    if not len(buf) or buf[-1] != 10:
        ends = np.append(ends, len(buf))
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    content = np.flatnonzero((buf != 32) & (buf != 9) & (buf != 13) & (buf != 10))
    first, last = np.searchsorted(content, starts), np.searchsorted(content, ends) - 1
    lines = np.flatnonzero(first <= last)
    shaped = np.zeros(len(starts), dtype=bool)
    shaped[lines] = (buf[content[first[lines]]] == ord("{")) & (buf[content[last[lines]]] == ord("}"))
    yield from _jsonl_lines(data, starts, ends, lines, shaped, first_line)


def _jsonl_lines(data: bytes, starts, ends, lines, shaped, first_line: int) -> Iterator[Chunk]:
    """Lines `lines` of the block: all at once by pyarrow, or halved until the lines pyarrow cannot
    take (a wrong type, bad JSON) are in small groups read line by line: a bad row slows down a
    few of its neighbours, not its whole block."""

    if not len(lines):
        return
    if shaped[lines].all():
        table = _read_json(data[starts[lines[0]]:ends[lines[-1]]])
        if table is not None and table.num_rows == len(lines):
            # rows that need the per-row path are read again by json (pyarrow makes 1 a float, 1.0)
            yield Chunk(first_line + lines, table=table,
                        reread=lambda positions: [_json_row(data[starts[lines[p]]:ends[lines[p]]]) for p in positions])
            return
    if len(lines) <= 16:
        yield Chunk(first_line + lines, rows=[_json_row(data[starts[i]:ends[i]]) for i in lines])
        return
    half = len(lines) // 2
    yield from _jsonl_lines(data, starts, ends, lines[:half], shaped, first_line)
    yield from _jsonl_lines(data, starts, ends, lines[half:], shaped, first_line)


# ids may be numbers in JSONL (they become strings); pyarrow types a column one way per read
_RAW_SCHEMA_NUMBER_IDS = RAW_SCHEMA.set(0, pa.field("id", pa.int64()))


def _read_json(data: bytes) -> pa.Table | None:
    import pyarrow.json as pajson

    read = pajson.ReadOptions(use_threads=False, block_size=max(len(data), 1 << 16))
    for schema in (RAW_SCHEMA, _RAW_SCHEMA_NUMBER_IDS):
        try:
            return pajson.read_json(pa.py_buffer(data), read_options=read,
                                    parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
        except pa.ArrowInvalid as e:
            if "Column(/id)" not in str(e):
                return None
    return None


def _json_row(line: bytes) -> dict | Exception:
    """One line as json reads it: a dict, or why it is not a JSON object."""
    try:
        row = json.loads(line.decode("utf-8"))  # UnicodeDecodeError: the file is not UTF-8 (ManifestError)
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        return row
    except UnicodeDecodeError:
        raise
    except ValueError as e:
        return e
    except RecursionError:  # json's parser recurses per nesting level: 100,000 '[' exhaust the stack
        return ValueError("the line nests arrays or objects too deeply to be a manifest row")


def _csv_chunks(open_binary) -> Iterator[Chunk]:
    """pyarrow's CSV reader (cells as strings, empty cells absent); a file it cannot read (a row
    with more cells than the header) is read on with Python's csv module, as before. Line numbers
    count records after the header, as csv.DictReader does."""
    import numpy as np
    import pyarrow.csv as pacsv

    done = 0
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in MANIFEST_COLUMNS}, include_columns=MANIFEST_COLUMNS,
                                   include_missing_columns=True, null_values=[""], strings_can_be_null=True,
                                   quoted_strings_can_be_null=True)
    try:
        with open_binary() as f:
            reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=SCAN_CHUNK_BYTES, use_threads=False),
                                    parse_options=pacsv.ParseOptions(newlines_in_values=True), convert_options=convert)
            for batch in reader:
                yield Chunk(np.arange(done + 2, done + 2 + batch.num_rows), table=pa.Table.from_batches([batch]))
                done += batch.num_rows
        return
    except pa.ArrowInvalid:
        pass
    # utf-8-sig: spreadsheet programs start CSV with a byte-order mark
    with open_binary() as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
        rows, numbers = [], []
        for n, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
            if n - 2 < done:
                continue
            rows.append(_coerce_csv_row(row))
            numbers.append(n)
            if len(rows) >= SCAN_BATCH_ROWS:
                yield Chunk(np.array(numbers), rows=rows)
                rows, numbers = [], []
        if rows:
            yield Chunk(np.array(numbers), rows=rows)


_NUMBER = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"  # what float() reads that pyarrow's cast reads alike


def _conform(table: pa.Table, fmt: str) -> tuple[pa.Table, "np.ndarray"]:
    """The manifest's columns in RAW_SCHEMA types, and a mask of the rows that need the per-row
    path: a value of another type (an integer id is fine), or in CSV a JSON list or a number
    pyarrow would read differently than Python."""
    import numpy as np
    import pyarrow.compute as pc

    slow = np.zeros(table.num_rows, dtype=bool)
    columns = {}
    for field in RAW_SCHEMA:
        if field.name not in table.column_names:
            columns[field.name] = pa.nulls(table.num_rows, field.type)
            continue
        col = table[field.name].combine_chunks()
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        present = col.is_valid().to_numpy(zero_copy_only=False)
        value, odd = None, np.zeros(table.num_rows, dtype=bool)
        if fmt == "csv" and pa.types.is_string(col.type) and field.type != pa.string():
            if pa.types.is_list(field.type):  # one value, or a JSON list (the per-row path parses it)
                odd = pc.fill_null(pc.starts_with(pc.utf8_ltrim_whitespace(col), "["), False).to_numpy(zero_copy_only=False)
                offsets = np.concatenate(([0], np.cumsum(present))).astype(np.int32)
                value = pa.ListArray.from_arrays(pa.array(offsets), col.drop_null(), mask=pc.invert(col.is_valid()))
            else:
                odd = ~pc.fill_null(pc.match_substring_regex(col, _NUMBER), True).to_numpy(zero_copy_only=False)
                value = pc.cast(pc.if_else(pa.array(odd), pa.scalar(None, pa.string()), col), pa.float64())
        elif col.type == field.type or (pa.types.is_large_string(col.type) and field.type == pa.string()) or (
                pa.types.is_floating(field.type) and (pa.types.is_integer(col.type) or pa.types.is_floating(col.type))) or (
                field.name == "id" and pa.types.is_integer(col.type)):
            value = pc.cast(col, field.type)
        elif pa.types.is_list(field.type) and (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) and (
                pa.types.is_string(col.type.value_type) or pa.types.is_large_string(col.type.value_type)):
            value = pc.cast(col, field.type)
        if value is None:
            odd = present
            value = pa.nulls(table.num_rows, field.type)
        if pa.types.is_floating(field.type):  # NaN: pandas' absent value; the per-row path drops it too
            value = pc.if_else(pc.fill_null(pc.is_nan(value), False), pa.scalar(None, field.type), value)
        slow |= odd & present
        columns[field.name] = value
    return pa.table(columns, schema=RAW_SCHEMA), slow


@functools.cache
def _max_items(column: str) -> int:
    return schemas.load("manifest")["properties"][column].get("maxItems", 2**31)


def _list_items_ok(col, name: str) -> "np.ndarray":
    """Rows of a list<string> column that hold 1 to the schema's maxItems items, each a non-empty
    string (or are null): the manifest schema's rule for the column `name`, for a whole table."""
    import pyarrow.compute as pc

    most = _max_items(name)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    bad_item = pc.fill_null(pc.equal(pc.utf8_length(col.flatten()), 0), True).to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(col), 1).to_numpy(zero_copy_only=False)
    ok = (lengths >= 1) & (lengths <= most)
    ok[_parents(col)[bad_item]] = False
    return ok


def _parents(lists) -> "np.ndarray":
    """The row of each item of lists.flatten() (which skips null lists, whatever their offsets say)."""
    import numpy as np
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    return np.repeat(np.arange(len(lengths)), lengths)


def _plain_rows(t: pa.Table, cfg: CaptionConfig) -> "np.ndarray":
    """Rows that validate_row accepts for certain (the schema and the checks after it), for the
    whole table at once; the others go through validate_row, which words what is wrong."""
    import pyarrow.compute as pc

    def mask(expr):
        return pc.fill_null(expr, False).to_numpy(zero_copy_only=False)

    def absent(name):
        return pc.is_null(t[name]).to_numpy(zero_copy_only=False)

    def nonempty(name):
        return mask(pc.greater(pc.utf8_length(t[name]), 0))

    has_uri, has_uris = ~absent("uri"), ~absent("uris")
    ok = nonempty("id") & (has_uri != has_uris) & (~has_uri | nonempty("uri")) & _list_items_ok(t["uris"], "uris")
    ok &= absent("media_type") | mask(pc.is_in(t["media_type"], pa.array(["video", "image"])))
    ok &= ~has_uris | absent("media_type") | mask(pc.equal(t["media_type"], "image"))
    ok &= (absent("prompt") | nonempty("prompt")) & _list_items_ok(t["questions"], "questions")
    ok &= (absent("start_s") | mask(pc.greater_equal(t["start_s"], 0))) & (absent("end_s") | mask(pc.greater(t["end_s"], 0)))
    ok &= absent("start_s") | absent("end_s") | mask(pc.greater(t["end_s"], t["start_s"]))
    if cfg.task == "qa" and not cfg.prompt:
        ok &= ~absent("questions") | ~absent("prompt")
    return ok


def _resolved(uris, manifest_file: str | None):
    """_resolve_relative for a whole string array."""
    import pyarrow.compute as pc

    if manifest_file is None:
        return uris
    folder = manifest_file.rsplit("/", 1)[0] + "/"
    relative = pc.invert(pc.or_(pc.match_substring(uris, ":"), pc.starts_with(uris, "/")))
    return pc.if_else(relative, pc.binary_join_element_wise(folder, uris, ""), uris)


def _fast_records(t: pa.Table, numbers, uri: str, index: int, label: str, prefixes: list[str]):
    """Records of plain rows, built for the whole table at once; and the rows whose media URIs need
    the per-row check after all."""
    import numpy as np
    import pyarrow.compute as pc

    from pipeline.io.urls import media_uris_surely_allowed

    single = _resolved(t["uri"], uri)
    lists = t["uris"].combine_chunks() if isinstance(t["uris"], pa.ChunkedArray) else t["uris"]
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
    many = pa.ListArray.from_arrays(offsets, _resolved(lists.flatten(), uri), mask=pc.is_null(lists))
    sure = media_uris_surely_allowed(pc.fill_null(single, ""), prefixes) | pc.is_null(single).to_numpy(zero_copy_only=False)
    flat_sure = media_uris_surely_allowed(many.flatten(), prefixes)
    sure[_parents(many)[~flat_sure]] = False
    n = t.num_rows
    source = (pc.binary_join_element_wise(f"{uri}:{label} ", pc.cast(pa.array(numbers), pa.string()), "") if uri
              else pa.nulls(t.num_rows, pa.string()))
    nothing = pa.nulls(n, pa.string())
    records = pa.table({
        "id": t["id"], "uri": single, "uris": many, "media_type": t["media_type"], "prompt": t["prompt"],
        "questions": t["questions"], "start_s": t["start_s"], "end_s": t["end_s"], "source": source,
        "status": pa.repeat(pa.scalar("ok"), n), "error_type": nothing, "error": nothing,
        "prompts": pa.nulls(n, pa.list_(pa.string())), "retry_prompts": pa.nulls(n, pa.list_(pa.string())),
        "_order": pa.array((index << ROW_BITS) | np.asarray(numbers, dtype=np.int64)),
    }, schema=SCAN_SCHEMA)
    return records.filter(pa.array(sure)), ~sure


def _scan_row(source: str | None, row: dict | Exception, manifest_file: str | None, prefixes: list[str], cfg: CaptionConfig) -> dict:
    """One manifest row -> its record: ok, invalid_manifest_row or uri_not_allowed (repeated ids
    are marked by mark_duplicates, once all rows of an id are together)."""
    from pipeline.io.urls import URLRejected, check_media_uri

    if isinstance(row, Exception):
        return _record({}, source, f"not valid JSON ({row})")
    row = _normalize(row)
    problem = validate_row(row)
    if not problem and cfg.task == "qa" and not (row.get("questions") or row.get("prompt") or cfg.prompt):
        problem = "--task qa needs questions: add a 'questions' list (or a 'prompt') to the row, or pass --prompt"
    if problem:
        return _record(row, source, problem)
    if "uris" in row:
        row["uris"] = [_resolve_relative(u, manifest_file) for u in row["uris"]]
    else:
        row["uri"] = _resolve_relative(row["uri"], manifest_file)
    try:
        for media in row.get("uris") or [row["uri"]]:
            check_media_uri(media, prefixes)
    except URLRejected as e:
        hint = "pass --allow-uri-prefix with its prefix" if manifest_file else "add its prefix to allowed_uri_prefixes"
        return _record(row, source, f"uri {media!r} is not allowed: {e}; if this source is trusted, {hint}", "uri_not_allowed")
    return _record(row, source)


def scan_file(uri: str, index: int, prefixes: list[str], cfg: RunConfig) -> Iterator[pa.Table]:
    """The records (SCAN_SCHEMA) of the `index`-th manifest file, one table per chunk; repeated ids
    are not marked yet. ManifestError when the file cannot be read at all."""
    fmt = manifest_format(uri)
    label = "row" if fmt == "parquet" else "line"
    try:
        for chunk in _file_chunks(uri, fmt, cfg):
            yield _chunk_records(chunk, fmt, uri, index, label, prefixes, cfg)
    except (OSError, UnicodeDecodeError, pa.ArrowInvalid, csv.Error) as e:
        raise ManifestError(f"cannot read manifest file {uri}: {e}") from e


def _chunk_records(chunk: Chunk, fmt: str, uri: str | None, index: int, label: str, prefixes: list[str],
                   cfg: CaptionConfig) -> pa.Table:
    """The records (SCAN_SCHEMA) of one chunk: plain rows for the whole table at once, the others
    row by row. `uri`: the manifest file (None: the rows of a user's Dataset, pipeline.caption)."""
    import numpy as np

    parts, rows, numbers = [], chunk.rows or [], chunk.numbers
    if chunk.table is not None:
        table, slow = _conform(chunk.table, fmt)
        slow |= ~_plain_rows(table, cfg)
        plain = np.flatnonzero(~slow)
        fast, unsure = _fast_records(table.take(plain), numbers[plain], uri, index, label, prefixes)
        parts.append(fast)
        pick = np.sort(np.concatenate([np.flatnonzero(slow), plain[unsure]]))
        rows = chunk.reread(pick) if chunk.reread else chunk.table.take(pa.array(pick, pa.int64())).to_pylist()
        if fmt == "csv":
            rows = [_coerce_csv_row(r) for r in rows]
        numbers = numbers[pick]
    if rows:
        records = [dict(_scan_row(f"{uri}:{label} {n}" if uri else None, row, uri, prefixes, cfg),
                        _order=(index << ROW_BITS) | int(n)) for n, row in zip(numbers, rows)]
        parts.append(pa.Table.from_pylist(records, schema=SCAN_SCHEMA))
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def records_from_rows(rows: pa.Table, prefixes: list[str], cfg: CaptionConfig) -> pa.Table:
    """A batch of a user's Dataset (manifest columns; others ignored) -> its records (RECORD_SCHEMA), in
    its order, by the manifest's rules: invalid rows become `invalid_manifest_row` records, URIs outside
    `prefixes` `uri_not_allowed` ones. Ids are not checked for repeats (that needs every row of an id
    together: the batch job's plan does it). Ray Data runs this per batch (pipeline.caption)."""
    import numpy as np

    chunk = Chunk(np.arange(1, rows.num_rows + 1), table=rows)
    records = _chunk_records(chunk, "table", None, 0, "row", prefixes, cfg).sort_by("_order")
    return with_prompts(records.select(RECORD_SCHEMA.names), cfg)


def claims_id(records: pa.Table):
    """Rows that take their id: a later row with it is a duplicate (valid rows and rows refused by
    the URI policy; a row invalid for another reason does not take its id)."""
    import pyarrow.compute as pc

    return pc.and_(pc.is_valid(records["id"]),
                   pc.or_kleene(pc.is_null(records["error_type"]), pc.equal(records["error_type"], "uri_not_allowed")))


def mark_duplicates(records: pa.Table) -> pa.Table:
    """Duplicate-id policy, for a table (SCAN_SCHEMA) that holds every row of each of its ids: the
    first row of an id (by file, then line) is processed; each later valid row with that id becomes
    a `duplicate_id` error record (with no prompt), so nothing disappears silently."""
    import pyarrow.compute as pc

    claims = records.filter(claims_id(records))
    if pc.count_distinct(claims["id"]).as_py() == claims.num_rows:  # the usual manifest: no id repeats
        return records
    firsts = claims.group_by("id", use_threads=False).aggregate([("_order", "min")])
    first = pc.take(firsts["_order_min"], pc.index_in(records["id"], firsts["id"]))
    dup = pc.fill_null(pc.and_(pc.equal(records["status"], "ok"), pc.not_equal(records["_order"], first)), False)
    if not pc.any(dup).as_py():
        return records
    marked = [dict(_record(r, r["source"], f"id {r['id']!r} appeared earlier in the manifest; only its first row "
                                           "is processed", "duplicate_id"), _order=r["_order"])
              for r in records.filter(dup).to_pylist()]
    return pa.concat_tables([records.filter(pc.invert(dup)), pa.Table.from_pylist(marked, schema=SCAN_SCHEMA)])


def scan_manifest(cfg: RunConfig) -> ManifestScan:
    """Every manifest row read in this process (small manifests, tests), in the manifest's order:
    invalid rows and repeated ids become error records (never a crash). A run reads the manifest
    in Ray tasks instead (pipeline/planning/plan.py), through the same functions."""
    files = list_manifest_files(cfg.manifest, cfg)
    prefixes = media_prefixes(cfg.allowed_uri_prefixes, cfg.manifest)
    tables = [t for i, uri in enumerate(files) for t in scan_file(uri, i, prefixes, cfg)]
    records = with_prompts(mark_duplicates(pa.concat_tables([SCAN_SCHEMA.empty_table(), *tables])).sort_by("_order"), cfg)
    return ManifestScan(records.drop_columns(["_order"]), files, prefixes)


def prompts_for(record: dict, media_type: str | None, cfg: CaptionConfig) -> list[str | None]:
    """The prompts of one item: its questions (qa), else its own prompt, else the run's default.
    A row that is not an item (invalid, or a repeated id) has one output row, without a prompt."""
    if record["error_type"] in ("invalid_manifest_row", "duplicate_id"):
        return [None]
    if cfg.task == "qa" and record.get("questions"):
        return list(record["questions"])
    kind = "images" if len(record.get("uris") or []) > 1 else media_type or record.get("media_type")
    return [record.get("prompt") or cfg.default_prompt(kind)]


def own_prompts(records: pa.Table, cfg: CaptionConfig):
    """prompts_for for a whole table, except the default: the prompts each record asks for itself (its
    questions with qa, else its prompt), null where it takes the run's default prompt (that depends on
    the media type its file turns out to have: the decode stage picks it), [null] for a row that is
    not an item (invalid, a repeated id: one output row, without a prompt)."""
    import numpy as np
    import pyarrow.compute as pc

    n = records.num_rows
    offsets = pa.array(np.arange(n + 1, dtype=np.int32))  # one prompt per record
    prompt = _array(records["prompt"])
    own = pa.ListArray.from_arrays(offsets, prompt, mask=pc.is_null(prompt))
    if cfg.task == "qa":
        questions = _array(records["questions"])
        own = pc.if_else(pc.is_valid(questions), questions, own)
    no_item = pc.fill_null(pc.is_in(records["error_type"], pa.array(["invalid_manifest_row", "duplicate_id"])), False)
    return _array(pc.if_else(no_item, pa.ListArray.from_arrays(offsets, pa.nulls(n, pa.string())), own))


def with_prompts(records: pa.Table, cfg: CaptionConfig) -> pa.Table:
    """`records` with their own prompts to do (own_prompts): nothing committed yet."""
    return records.set_column(records.schema.get_field_index("prompts"), "prompts", own_prompts(records, cfg))


def _array(values):
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
