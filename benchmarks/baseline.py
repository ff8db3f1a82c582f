"""The baselines: the LLaVA-OneVision model card's usage, one item at a time.

    container = av.open(path); indices = np.arange(0, total_frames, total_frames / N).astype(int)
    video = read_video_pyav(container, indices)            # decode every frame up to the last index
    inputs = processor(videos=video, text=prompt)          # or images=PIL.Image.open(path)
    model.generate(**inputs, max_new_tokens=..., do_sample=False)
"""

from __future__ import annotations

import json
import time

import numpy as np


def card_indices(total_frames: int, n: int, first: int = 0, last: int | None = None) -> np.ndarray:
    """The card's frame indices, over [first, last) frames (a clip window) when given."""
    last = total_frames if last is None else last
    return (first + np.arange(0, last - first, (last - first) / n)).astype(int)[:n]


def read_video_pyav(container, indices) -> tuple[np.ndarray, int]:
    """The card's read_video_pyav (decode from the start, keep the frames at `indices`), returning
    the frames and how many frames were decoded."""
    frames, decoded = [], 0
    container.seek(0)
    wanted = set(int(i) for i in indices)
    end_index = int(indices[-1])
    for i, frame in enumerate(container.decode(video=0)):
        decoded += 1
        if i > end_index:
            break
        if i in wanted:
            frames.append(frame)
    return np.stack([x.to_ndarray(format="rgb24") for x in frames]), decoded


def card_decode(path: str, n: int, start_s: float | None = None, end_s: float | None = None) -> tuple[np.ndarray, int]:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        total = stream.frames
        fps = float(stream.average_rate)
        first = int(round((start_s or 0.0) * fps))
        last = min(total, int(round(end_s * fps))) if end_s is not None else total
        return read_video_pyav(container, card_indices(total, n, first, last))


def card_decode_timed_pass(path: str, counts: list[int]) -> dict[int, dict]:
    """The card's decode for several frame counts N in ONE decode pass: decoding is sequential, so
    the time to reach N's last index (plus converting N's frames) is what a separate run for N costs."""
    import av

    out = {}
    with av.open(path) as container:
        total = container.streams.video[0].frames
        plans = {n: card_indices(total, n) for n in counts}
        wanted = {n: set(int(i) for i in idx) for n, idx in plans.items()}
        frames = {n: [] for n in counts}
        start = time.perf_counter()
        container.seek(0)
        end = max(int(idx[-1]) for idx in plans.values())
        for i, frame in enumerate(container.decode(video=0)):
            for n in counts:
                if i in wanted[n]:
                    frames[n].append(frame)
                if i == int(plans[n][-1]) + 1:  # the card breaks on the frame after its last index
                    out[n] = {"decode_s": time.perf_counter() - start, "decoded_frames": i + 1}
            if i > end:
                break
        for n in counts:
            out.setdefault(n, {"decode_s": time.perf_counter() - start, "decoded_frames": total})
            t = time.perf_counter()
            np.stack([x.to_ndarray(format="rgb24") for x in frames[n]])
            out[n]["decode_s"] += time.perf_counter() - t
            out[n]["sampled_frames"] = len(frames[n])
    return out


def sequential_loop(model_dir: str, manifest: str, num_frames: int, max_new_tokens: int,
                    shapes: dict | None = None, part: slice = slice(None)) -> dict:
    """The card's loop over a manifest: decode -> processor -> generate, one item at a time.
    Returns start-up (processor + model load) and loop seconds; `shapes` collects one model input
    per (media type, prompt length), for counting FLOPs afterwards; `part` selects manifest rows."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipeline.config import DEFAULT_PROMPTS
    from pipeline.media.fetch import sniff_media_type

    t0 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = time.perf_counter()
    items = [json.loads(line) for line in open(manifest) if line.strip()][part]
    texts, model_s = [], 0.0
    for item in items:
        with open(item["uri"], "rb") as f:
            kind = sniff_media_type(f.read(512))
        conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": DEFAULT_PROMPTS[kind]}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        if kind == "image":
            inputs = processor(images=Image.open(item["uri"]), text=prompt, return_tensors="pt")
        else:
            video, _ = card_decode(item["uri"], num_frames, item.get("start_s"), item.get("end_s"))
            inputs = processor(videos=video, text=prompt, return_tensors="pt")
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        model_s += time.perf_counter() - t
        if shapes is not None:
            shapes.setdefault((kind, int(inputs["input_ids"].shape[1])), inputs)
        texts.append(processor.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    done = time.perf_counter()
    return {"items": len(items), "startup_s": loaded - t0, "loop_s": done - loaded, "wall_s": done - t0,
            "model_s": model_s, "texts": texts}


def driver_planning(cfg) -> dict:
    """How a run planned on the driver before distributed planning (main before 9209a33), for
    the scale benchmark: every manifest row read and validated one at a time in this process
    (json.loads, pipeline.planning.manifest._scan_row, a `seen` set for repeated ids), every committed row
    of the run's settings read into a dict (id -> {prompt: (status, media type, file)}), and a
    Python loop over the records for what is still to do (prompts_for). Returns the counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io.storage import filesystem
    from pipeline.io.urls import media_prefixes
    from pipeline.planning.manifest import RECORD_SCHEMA, _scan_row, list_manifest_files, prompts_for

    files = list_manifest_files(cfg.manifest, cfg)
    prefixes = media_prefixes(cfg.allowed_uri_prefixes, cfg.manifest)
    records, seen = [], set()
    for uri in files:
        fs, path = filesystem(uri, cfg.storage)
        with fs.open(path, "rt", encoding="utf-8-sig") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    row = e
                rec = _scan_row(f"{uri}:line {n}", row, uri, prefixes, cfg)
                claims = rec["id"] is not None and rec["error_type"] in (None, "uri_not_allowed")
                if claims and rec["id"] in seen and rec["status"] == "ok":
                    rec.update(status="error", error_type="duplicate_id", prompt=None,
                               error=f"{rec['source']}: id {rec['id']!r} appeared earlier in the manifest")
                elif claims:
                    seen.add(rec["id"])
                records.append(rec)
    table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
    del records
    # commit.committed: every committed row of the run's settings, as Python objects
    rows, sources = {}, set()
    fs, out = filesystem(cfg.output, cfg.storage)
    key = cfg.config_key()
    for path in sorted(p for p in (fs.ls(out, detail=False) if fs.exists(out) else []) if p.endswith(".parquet")):
        t = pq.read_table(path, columns=["id", "prompt", "status", "media_type", "source", "config_key"]).to_pydict()
        for i, prompt, status, media, source, k in zip(*t.values()):
            if k != key:
                continue
            if i is None:
                sources.add(source)
            else:
                rows.setdefault(i, {})[prompt] = (status, media, path)
    # run.pending: a loop over every record -> the records to do, with the prompts they still have
    keep, todo_prompts = [], []
    for rec in table.select(["id", "source", "media_type", "prompt", "questions", "error_type"]).to_pylist():
        if rec["id"] is None:
            keep.append(rec["source"] not in sources)
            todo_prompts.append([None])
            continue
        done = rows.get(rec["id"], {})
        finished = {p for p, (status, _, _) in done.items() if status == "ok" or not cfg.retry_errors}
        media = next((m for _, m, _ in done.values() if m), rec["media_type"])
        expected = prompts_for(rec, media, cfg)
        keep.append(not finished.issuperset(expected))
        todo_prompts.append([p for p in expected if p not in finished])
    todo = table.set_column(table.schema.get_field_index("prompts"), "prompts",
                            pa.array(todo_prompts, pa.list_(pa.string()))).filter(pa.array(keep, pa.bool_()))
    invalid = table.num_rows - table["error_type"].null_count
    return {"items": table.num_rows, "todo": todo.num_rows, "committed": table.num_rows - todo.num_rows, "invalid": invalid}
