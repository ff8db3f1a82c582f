"""A static HTML page that shows what a run produced: for each item a strip of the frames the model
saw (re-decoded at `frame_timestamps_s` from `uri` by the pipeline's own decoder) beside its captions
or answers, error rows grouped by error_type, and the run's figures (its ledger `_runs/RUN_ID.json` and counts).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import defaultdict

import pyarrow.dataset as pads

from pipeline.config import StorageConfig
from pipeline.output.location import OutputLocation
from pipeline.schemas import output_arrow_schema

THUMB_HEIGHT = 96
MAX_FRAMES_SHOWN = 8
# What the commit writes (run ids, part file names): anything else in a ledger or _SUCCESS was not
# written by a run and could point the report outside the output (`../../elsewhere/x`).
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PART_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.parquet")


class ForgedOutput(ValueError):
    """The output's ledger or _SUCCESS names something a run never writes; the message says what."""


def _checked(name: str, pattern: re.Pattern, what: str, where: str) -> str:
    if not isinstance(name, str) or not pattern.fullmatch(name) or ".." in name:
        raise ForgedOutput(f"{where} names {what} {name!r}, which no run writes (it may have been altered): "
                           "restore the file from a backup, or pass --run-id with a run of _runs/")
    return name


def read_output(output: str, storage: StorageConfig, run_id: str | None = None) -> tuple[list[dict], dict]:
    """The rows of one committed run (default: the last one, named by `_SUCCESS`) and its ledger
    (`_runs/RUN_ID.json`). Only the files its ledger lists are read, so the rows of the output's
    other runs never mix into this run's page and figures."""
    out = OutputLocation.of(output, storage)
    fs = out.fs
    fs.invalidate_cache()
    if run_id is None:
        if not fs.exists(out.success):
            raise FileNotFoundError(f"{output} holds no committed run (no _SUCCESS): the run did not complete, "
                                    "or this is not its --output")
        success = _read_json(fs, out.success)
        run_id = success.get("run_id") if isinstance(success, dict) else None
        _checked(run_id, _RUN_ID, "the run id", f"{output}/_SUCCESS")
    else:
        _checked(run_id, _RUN_ID, "the run id", "--run-id")
    ledger_path = out.ledger(run_id)
    if not fs.exists(ledger_path):
        runs = sorted(p.rsplit("/", 1)[-1].removesuffix(".json") for p in fs.glob(out.child("_runs", "*.json")))
        raise FileNotFoundError(f"no committed run {run_id} in {output} (committed runs: {', '.join(runs) or 'none'})")
    ledger = _read_json(fs, ledger_path)
    where = f"{output}/_runs/{run_id}.json"
    paths = [out.child(_checked(name, _PART_FILE, "the file", where)) for name in ledger.get("files", [])]
    if not paths:
        return [], ledger
    rows = pads.dataset(paths, schema=output_arrow_schema(), format="parquet", filesystem=out.arrow).to_table().to_pylist()
    return rows, ledger


def _read_json(fs, path: str) -> dict:
    with fs.open(path, "r") as f:
        return json.load(f)


def _thumbnail(rgb) -> str:
    """(H, W, 3) uint8 -> data URI of a small JPEG."""
    from PIL import Image

    image = Image.fromarray(rgb)
    image.thumbnail((THUMB_HEIGHT * 4, THUMB_HEIGHT))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _shown(timestamps: list[float]) -> list[float]:
    if len(timestamps) <= MAX_FRAMES_SHOWN:
        return timestamps
    step = (len(timestamps) - 1) / (MAX_FRAMES_SHOWN - 1)
    return [timestamps[round(i * step)] for i in range(MAX_FRAMES_SHOWN)]


class FrameReader:
    """The frames a run showed the model, decoded as the run decoded them: the pipeline's media
    code (rotation, colour, 16-bit scaling) in its isolated decoder process (a bad file costs one
    strip, not the report), with the run's pixel budget (from its ledger config), under the URL
    rules the operator gives (`allowed_prefixes`; anyone who can write to the output can rewrite
    its ledger) or, only when the operator says so (`trust_ledger`), the run's own."""

    def __init__(self, config: dict | None, storage: StorageConfig, allowed_prefixes: list[str] | None = None,
                 trust_ledger: bool = False):
        from pipeline.config import ModelSettings
        from pipeline.media.decoder_process import DecoderProcess

        defaults = ModelSettings.model_fields
        config = config or {}
        self.storage = storage
        self.prefixes = list(allowed_prefixes or []) or None
        if self.prefixes is None and trust_ledger:
            self.prefixes = config.get("allowed_uri_prefixes") or (
                _default_prefixes(config["manifest"]) if config.get("manifest") else None)
        self.max_pixels = config.get("max_pixels") or defaults["max_pixels"].default
        self.decoder = DecoderProcess(config.get("decode_timeout_s") or defaults["decode_timeout_s"].default,
                                      max_memory_bytes=int((config.get("decoder_memory_gb")
                                                            or defaults["decoder_memory_gb"].default) * 2**30))

    def thumbnails(self, row: dict) -> list[tuple[float | None, str]]:
        """(timestamp, data URI) of the frames the model saw; the images themselves for images."""
        if row.get("uris"):  # several images in one prompt: each of them
            return [(None, _thumbnail(self._decode(uri, "image").frames[0])) for uri in row["uris"][:MAX_FRAMES_SHOWN]]
        if row["media_type"] == "image":
            return [(None, _thumbnail(self._decode(row["uri"], "image").frames[0]))]
        wanted = _shown(row["frame_timestamps_s"] or [])
        d = self._decode(row["uri"], "video", at_s=wanted)
        return [(t, _thumbnail(frame)) for t, frame in zip(d.timestamps_s, d.frames)]

    def _decode(self, uri: str, media_type: str, at_s: list[float] | None = None):
        from pipeline.io.urls import check_media_uri

        if self.prefixes is None:
            raise PermissionError("no URL rules for the media: pass --allow-uri-prefix with the media's folder or "
                                  "bucket (or --frames-from-ledger for an output only trusted runs write)")
        check_media_uri(uri, self.prefixes)  # the file may have been swapped for a link since the run
        # the batch job's own fetch + decode, the opened file checked against the rules as in the job
        return self.decoder.decode(uri=uri, storage=self.storage, declared_type=media_type,
                                   num_frames=len(at_s) if at_s else 1, max_pixels=self.max_pixels, at_s=at_s,
                                   allowed_prefixes=self.prefixes)

    def close(self) -> None:
        self.decoder.close()


def _default_prefixes(manifest: str) -> list[str]:
    from pipeline.io.urls import default_media_prefixes

    return default_media_prefixes(manifest)


CSS = """
body{font-family:sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table.figures td{padding:2px 12px 2px 0} .item{display:flex;gap:16px;margin:12px 0;padding:8px;border:1px solid #ddd}
.strip{display:flex;gap:4px;flex-wrap:wrap;max-width:60%} .strip figure{margin:0;text-align:center;font-size:11px}
.strip img{height:96px;display:block} .answers{flex:1} .answers dt{font-weight:bold;margin-top:6px}
.meta{color:#666;font-size:12px} table.errors{border-collapse:collapse;font-size:13px}
table.errors td,table.errors th{border:1px solid #ddd;padding:3px 6px;text-align:left}
.warn{color:#a40} .flags{color:#a40;font-size:12px;margin-left:6px}
"""
QUALITY_EXAMPLES = 3  # rows shown per flag in the quality section (each links to its item, frames beside it)


def _quality(rows: list[dict], success: dict | None) -> list[str]:
    """The quality section: rows per flag (with examples linking to their items) and per finish
    reason, and the run's cross-row checks from its ledger."""
    from collections import Counter

    e = html.escape
    judged = [r for r in rows if r["status"] == "ok" and r.get("quality_flags") is not None]
    if not judged:
        return ["<h2>Quality</h2><p class='meta'>no quality flags (rows written before schema version 2)</p>"]
    flagged = sum(bool(r["quality_flags"]) for r in judged)
    finish = Counter(r["finish_reason"] for r in judged if r.get("finish_reason"))
    parts = [f"<h2 id='quality'>Quality</h2><p>{flagged} of {len(judged)} generated rows flagged; finish reasons: "
             + e(", ".join(f"{k} {v}" for k, v in sorted(finish.items())) or "none") + "</p>",
             "<table class='errors'><tr><th>flag</th><th>rows</th><th>examples</th></tr>"]
    by_flag = defaultdict(list)
    for r in judged:
        for flag in r["quality_flags"]:
            by_flag[flag].append(r)
    for flag, group in sorted(by_flag.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        examples = "<br>".join(f"<a href='#item-{e(str(r['id']))}'>{e(str(r['id']))}</a>: {e((r['text'] or '')[:160])}"
                               for r in group[:QUALITY_EXAMPLES])
        parts.append(f"<tr id='flag-{e(flag)}'><td>{e(flag)}</td><td>{len(group)}</td><td>{examples}</td></tr>")
    parts.append("</table>")
    for name, check in sorted(((success or {}).get("quality_checks") or {}).items()):
        parts.append(f"<p id='check-{e(name)}'>{e(name)}: {check['found']} found ({check['rows']} rows)"
                     + "".join(f"<br><span class='meta'>{e(json.dumps(x)[:300])}</span>" for x in check["examples"]) + "</p>")
    return parts



def _figures(rows: list[dict], success: dict | None) -> list[tuple[str, str]]:
    ok = sum(r["status"] == "ok" for r in rows)
    items = len({(r["id"], r["source"]) for r in rows})
    figures = [("rows", str(len(rows))), ("items", str(items)), ("ok rows", str(ok)),
               ("error rows", str(len(rows) - ok))]
    run_ids = sorted({r["run_id"] for r in rows})
    models = sorted({r["model"] for r in rows})
    figures += [("run", ", ".join(run_ids)), ("model", ", ".join(models))]
    tokens = [r["output_tokens"] for r in rows if r["output_tokens"]]
    if tokens:
        figures.append(("output tokens", f"{sum(tokens)} ({sum(tokens) / len(tokens):.1f} per row)"))
    if success:
        wall = success.get("wall_s")
        if wall:
            figures.append(("wall time", f"{wall:.1f} s ({success.get('items', 0) / wall:.2f} items/s)"))
        cfg = success.get("config") or {}
        for key in ("task", "num_frames", "batch_size", "replicas"):
            if key in cfg:
                figures.append((key, str(cfg[key])))
    else:
        figures.append(("_SUCCESS", "missing: the run did not complete, or this is not its output folder"))
    return figures


def render(rows: list[dict], success: dict | None, storage: StorageConfig | None = None,
           frames: bool = True, max_items: int = 500, allowed_prefixes: list[str] | None = None,
           trust_ledger: bool = False) -> str:
    storage = storage or StorageConfig()
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Run report</title><style>{CSS}</style>"
             "</head><body><h1>Run report</h1><table class='figures'>"]
    parts += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in _figures(rows, success)]
    parts.append("</table>")
    parts += _quality(rows, success)

    by_item = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            by_item[(r["id"], r["uri"] or " ".join(r.get("uris") or []))].append(r)
    parts.append(f"<h2>Items ({len(by_item)})</h2>")
    reader = FrameReader((success or {}).get("config"), storage, allowed_prefixes, trust_ledger) if frames else None
    for n, ((item_id, uri), answers) in enumerate(sorted(by_item.items(), key=lambda kv: str(kv[0][0]))):
        if n == max_items:
            parts.append(f"<p class='warn'>{len(by_item) - max_items} more items not shown (--max-items).</p>")
            break
        first = answers[0]
        strip = []
        if frames:
            try:
                for t, uri_data in reader.thumbnails(first):
                    label = "" if t is None else f"{t:.2f} s"
                    strip.append(f"<figure><img src='{uri_data}' alt='frame {e(label)}'><figcaption>{e(label)}"
                                 "</figcaption></figure>")
            except Exception as ex:  # the media may have moved since the run: say so, keep the page
                strip.append(f"<p class='warn'>frames unavailable: {e(type(ex).__name__)}: {e(str(ex))}</p>")
        meta = (f"{first['media_type']} {first['codec'] or ''} {first['width']}x{first['height']}"
                + (f", {first['duration_s']:.1f} s" if first["duration_s"] else ""))
        qa = "".join(f"<dt>{e(a['prompt'] or '')}</dt><dd>{e(a['text'] or '')}"
                     + (f"<span class='flags'>{e(', '.join(a['quality_flags']))}</span>" if a.get("quality_flags") else "")
                     + "</dd>" for a in answers)
        parts.append(f"<div class='item' id='item-{e(str(item_id))}'><div class='strip'>{''.join(strip)}</div>"
                     f"<div class='answers'><b>{e(str(item_id))}</b> <span class='meta'>{e(uri)} · {e(meta)}</span>"
                     f"<dl>{qa}</dl></div></div>")

    if reader is not None:
        reader.close()
    errors = defaultdict(list)
    for r in rows:
        if r["status"] == "error":
            errors[r["error_type"] or "unknown"].append(r)
    parts.append(f"<h2>Errors ({sum(map(len, errors.values()))})</h2>")
    for error_type, group in sorted(errors.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        parts.append(f"<h3 id='errors-{e(error_type)}'>{e(error_type)} ({len(group)})</h3>"
                     "<table class='errors'><tr><th>id</th><th>uri</th><th>source</th><th>error</th></tr>")
        parts += ["<tr>" + "".join(f"<td>{e(str(r[k] or ''))}</td>" for k in ("id", "uri", "source", "error")) + "</tr>" for r in group[:max_items]]
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)
