"""jobs/report.py: the HTML page shows each item's frames beside its answers, errors by type, the
run's figures; rendered in headless Chromium, the screenshot shows the content."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import report
from pipeline.schemas import output_arrow_schema
from pipeline.testing.samples import synthetic_frame

REPO = Path(__file__).resolve().parents[1]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MEDIA_PREFIXES: list[str] = []  # the folders of the `output` fixture's media


def row(**kw) -> dict:
    base = {name: None for name in output_arrow_schema().names}
    base.update(task="caption", status="ok", model="tiny", config_key="0123456789abcdef", run_id="run-1",
                created_at=datetime(2025, 1, 1, tzinfo=timezone.utc))
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def output(samples, tmp_path_factory) -> Path:
    """An output table in the job's layout, by hand (no model): Parquet files, the run's ledger, `_SUCCESS`."""
    from test_bad_media import write_mp4

    out = tmp_path_factory.mktemp("report-output")
    media = tmp_path_factory.mktemp("report-media")
    write_mp4(media / "phone.mp4", rotation=90)  # stored 160x120, shown 120x160
    secret = tmp_path_factory.mktemp("elsewhere") / "secret.jpg"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(secret)
    (media / "swapped.jpg").symlink_to(secret)  # swapped for a link to a file outside after the run
    video = dict(media_type="video", codec="h264", width=160, height=120, fps=24.0)
    rows = [
        row(id="phone", uri=str(media / "phone.mp4"), source="m.jsonl:10", prompt="Describe this video in detail.",
            text="CAPTION-phone", num_frames=2, frame_timestamps_s=[0.0, 1.0], duration_s=2.0, output_tokens=2,
            quality_flags=["length_outlier"], finish_reason="stop",
            **dict(video, width=120, height=160)),
        row(id="swapped", uri=str(media / "swapped.jpg"), source="m.jsonl:11", media_type="image", codec="JPEG",
            width=40, height=30, num_frames=1, prompt="Describe this photo.", text="CAPTION-swapped", output_tokens=2),
        row(id="street", uri=str(samples / "street.mp4"), source="m.jsonl:1", prompt="Describe this video in detail.",
            text="CAPTION-street: a white square moves over a gradient", num_frames=4,
            frame_timestamps_s=[0.0, 1.0, 2.0, 3.0], duration_s=4.0, output_tokens=9, quality_flags=[], finish_reason="stop",
            **video),
        row(id="beach", uri=str(samples / "beach.webm"), source="m.jsonl:3", task="qa", prompt="What moves?",
            text="ANSWER-beach-1 <b>not bold</b>", num_frames=3, frame_timestamps_s=[0.0, 1.0, 2.0], duration_s=3.0,
            output_tokens=4, **dict(video, codec="vp9")),
        row(id="beach", uri=str(samples / "beach.webm"), source="m.jsonl:3", task="qa", prompt="What colors?",
            text="ANSWER-beach-2", num_frames=3, frame_timestamps_s=[0.0, 1.0, 2.0], duration_s=3.0,
            output_tokens=3, **dict(video, codec="vp9")),
        row(id="photo", uri=str(samples / "photo.jpg"), source="m.jsonl:4", media_type="image", codec="JPEG",
            width=120, height=80, num_frames=1, prompt="Describe this photo.", text="CAPTION-photo", output_tokens=2,
            quality_flags=["repetition", "truncated"], finish_reason="length"),
        row(id="missing", uri=str(samples / "does-not-exist.mp4"), source="m.jsonl:7", status="error",
            error_type="not_found", error="no such file: does-not-exist.mp4"),
        row(id="gone", uri=str(samples / "gone.mp4"), source="m.jsonl:8", status="error",
            error_type="not_found", error="no such file: gone.mp4"),
        row(id=None, uri=None, source="m.jsonl:9", status="error", error_type="invalid_manifest_row",
            error="m.jsonl:9: 'id' is a required property"),
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=output_arrow_schema()), out / "run-1-part0.parquet")
    ledger = json.dumps({"run_id": "run-1", "items": 6, "wall_s": 12.0, "rows": 7, "files": ["run-1-part0.parquet"],
                         "quality_checks": {"same_text": {"found": 1, "rows": 6, "examples": [{"text": "SAME-TEXT"}]}},
                         "config": {"task": "caption", "num_frames": 4, "replicas": 2,
                                    "manifest": str(media / "m.jsonl"),
                                    "allowed_uri_prefixes": [str(samples), str(media)]}})
    (out / "_runs").mkdir()
    (out / "_runs" / "run-1.json").write_text(ledger)
    (out / "_SUCCESS").write_text(ledger)
    MEDIA_PREFIXES[:] = [str(samples), str(media)]  # what the operator allows the report to read
    return out


@pytest.fixture(scope="module")
def page(output, tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("report") / "report.html"
    prefixes = [arg for p in MEDIA_PREFIXES for arg in ("--allow-uri-prefix", p)]
    assert report.main(["--input", str(output), "--output", str(path), *prefixes]) == 0
    return path, path.read_text()


def test_page_has_answers_errors_by_type_and_figures(page):
    _, text = page
    for caption in ("CAPTION-street", "ANSWER-beach-1", "ANSWER-beach-2", "CAPTION-photo", "What colors?"):
        assert caption in text
    assert "&lt;b&gt;not bold&lt;/b&gt;" in text and "<b>not bold</b>" not in text  # model text is escaped
    assert re.search(r"<h3 id='errors-not_found'>not_found \(2\)</h3>", text)
    assert re.search(r"<h3 id='errors-invalid_manifest_row'>invalid_manifest_row \(1\)</h3>", text)
    assert text.index("errors-not_found") < text.index("errors-invalid_manifest_row")  # biggest group first
    assert "no such file: gone.mp4" in text and "m.jsonl:9" in text
    assert "<td>rows</td><td>9</td>" in text and "<td>error rows</td><td>3</td>" in text
    assert "12.0 s (0.50 items/s)" in text and "<td>replicas</td><td>2</td>" in text


def test_quality_section_counts_flags_with_examples_linked_to_their_frames(page):
    _, text = page
    quality = text[text.index("<h2 id='quality'>"):text.index("<h2>Items")]
    assert "3 of 3 generated rows flagged" not in quality and "2 of 3 generated rows flagged" in quality  # 3 rows judged
    assert "finish reasons: length 1, stop 2" in quality
    assert re.search(r"<tr id='flag-repetition'><td>repetition</td><td>1</td><td><a href='#item-photo'>photo</a>: CAPTION-photo", quality)
    assert "<tr id='flag-length_outlier'><td>length_outlier</td><td>1</td>" in quality
    assert "same_text: 1 found (6 rows)" in quality and "SAME-TEXT" in quality
    assert "CAPTION-photo<span class='flags'>repetition, truncated</span>" in text  # beside the item's frames


def thumbnails(text: str, item: str) -> list[Image.Image]:
    block = re.search(rf"<div class='item' id='item-{item}'>(.*?)</div></div>", text).group(1)
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in re.findall(r"base64,([^']+)'", block)]


def test_strips_hold_the_frames_the_model_saw(page):
    _, text = page
    street, beach, photo = thumbnails(text, "street"), thumbnails(text, "beach"), thumbnails(text, "photo")
    assert (len(street), len(beach), len(photo)) == (4, 3, 1)  # one strip per item, not per answer
    assert photo[0].size == (120, 80)  # shown upright (EXIF); small images are not enlarged
    assert all(im.height == 96 for im in street + beach)  # 120 px frames downscaled to the strip height
    # the frame at t = 1 s of the 24 fps sample is synthetic frame 24: compare pixels
    want = Image.fromarray(synthetic_frame(24, 160, 120)).resize(street[1].size)
    diff = np.abs(np.asarray(street[1].convert("RGB"), float) - np.asarray(want, float)).mean()
    other = np.abs(np.asarray(street[3].convert("RGB"), float) - np.asarray(want, float)).mean()
    assert diff < 12 < other


def test_strips_are_decoded_by_the_pipeline_upright_and_under_the_runs_url_rules(page):
    _, text = page
    phone = thumbnails(text, "phone")
    assert len(phone) == 2 and all(im.width < im.height for im in phone)  # the display rotation applied
    swapped = text.split("id='item-swapped'")[1].split("<div class='item'")[0]
    assert "<img" not in swapped and "frames unavailable" in swapped and "outside the allowed folders" in swapped


def test_missing_input_fails_with_the_reason(tmp_path, capsys):
    assert report.main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "r.html")]) == 2
    assert "cannot read the output table" in capsys.readouterr().err


def screenshot(html: Path, png: Path, tmp: Path) -> np.ndarray:
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={tmp / 'profile'}", f"--screenshot={png}", "--window-size=1200,1000",
                    html.as_uri()], check=True, timeout=120, capture_output=True)
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def colorful(pixels: np.ndarray) -> float:
    """Share of saturated pixels: the frames are colored gradients, the page's text is gray."""
    return float(((pixels.max(axis=2) - pixels.min(axis=2)) > 60).mean())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium; "
                    "tests/run.sh installs it when run as root)")
def test_headless_chromium_screenshot_shows_the_frames_and_text(page, output, tmp_path):
    html, _ = page
    shot = screenshot(html, tmp_path / "report.png", tmp_path)
    assert shot.shape[:2] == (1000, 1200)
    assert shot.std() > 20  # not blank
    dark = (shot.max(axis=2) < 100).mean()
    assert dark > 0.005  # text is drawn
    # the same page without frame strips: the color comes from the thumbnails
    bare = tmp_path / "bare.html"
    assert report.main(["--input", str(output), "--output", str(bare), "--no-frames"]) == 0
    bare_shot = screenshot(bare, tmp_path / "bare.png", tmp_path)
    assert colorful(shot) > 0.03 and colorful(bare_shot) < 0.002
    # the thumbnails' colors are varied (many distinct colors, not one flat block)
    saturated = shot[(shot.max(axis=2) - shot.min(axis=2)) > 60]
    assert len({tuple(p // 16) for p in saturated[:: max(1, len(saturated) // 20000)]}) > 50


def test_run_id_shows_one_run_of_an_output_with_two(tmp_path, capsys):
    """Two runs committed to one output (by commit.commit, as the job does): the page shows the last
    run's rows and figures by default, another run's with --run-id, never a mix."""
    from pipeline.config import RunConfig
    from pipeline.output import commit
    from pipeline.output.location import OutputLocation

    out = tmp_path / "captions"
    runs = {"run-1": ["a", "b", "c"], "run-2": ["d", "e"]}
    for run_id, ids in runs.items():
        cfg = RunConfig(manifest="unused", output=str(out), model="tiny", run_id=run_id)
        location = OutputLocation.of(cfg.output, cfg.storage)
        staging = Path(location.staging(run_id))
        staging.mkdir(parents=True)
        table = [row(id=i, uri=f"/media/{i}.jpg", source=f"m.jsonl:{n}", media_type="image", run_id=run_id,
                     prompt="Describe.", text=f"TEXT-{run_id}-{i}") for n, i in enumerate(ids)]
        pq.write_table(pa.Table.from_pylist(table, schema=output_arrow_schema()), staging / "0.parquet")
        commit.commit(location, cfg, commit.staged(location, run_id), {"run_id": run_id, "items": len(ids), "wall_s": 2.0})
    assert len(list(out.glob("*.parquet"))) == 2

    def page(*args) -> str:
        path = tmp_path / "r.html"
        assert report.main(["--input", str(out), "--output", str(path), "--no-frames", *args]) == 0
        return path.read_text()

    for run_id, text in [("run-2", page()), ("run-1", page("--run-id", "run-1")), ("run-2", page("--run-id", "run-2"))]:
        other = "run-1" if run_id == "run-2" else "run-2"
        assert all(f"TEXT-{run_id}-{i}" in text for i in runs[run_id])
        assert f"TEXT-{other}-" not in text
        assert f"<td>rows</td><td>{len(runs[run_id])}</td>" in text and f"<td>run</td><td>{run_id}</td>" in text
    capsys.readouterr()
    assert report.main(["--input", str(out), "--output", str(tmp_path / "x.html"), "--run-id", "run-3"]) == 2
    assert "no committed run run-3" in (err := capsys.readouterr().err) and "run-1, run-2" in err


def test_frames_come_only_from_where_the_operator_allows_not_from_the_ledger(output, tmp_path):
    """Anyone who can write to the output can rewrite its ledger: `allowed_uri_prefixes: ["/"]` there
    must not make the report read media outside the folders the operator names."""
    forged = tmp_path / "forged"
    shutil.copytree(output, forged)
    for name in ("_SUCCESS", "_runs/run-1.json"):
        ledger = json.loads((forged / name).read_text())
        ledger["config"]["allowed_uri_prefixes"] = ["/"]
        (forged / name).write_text(json.dumps(ledger))
    html_path = tmp_path / "r.html"
    assert report.main(["--input", str(forged), "--output", str(html_path)]) == 0
    text = html_path.read_text()
    assert "<img" not in text and "pass --allow-uri-prefix" in text  # no operator rules: no media read at all
    samples_only = ["--allow-uri-prefix", MEDIA_PREFIXES[0]]
    assert report.main(["--input", str(forged), "--output", str(html_path), *samples_only]) == 0
    text = html_path.read_text()
    assert thumbnails(text, "street") and not thumbnails(text, "phone")  # phone.mp4 is outside the samples folder
    assert report.main(["--input", str(output), "--output", str(html_path), "--frames-from-ledger"]) == 0
    assert thumbnails(html_path.read_text(), "phone")  # the run's own rules, when the operator trusts them


@pytest.mark.parametrize("forge", [
    {"_SUCCESS": {"run_id": "../../elsewhere/x"}},
    {"_SUCCESS": {"run_id": None}},
    {"_runs/run-1.json": {"files": ["../elsewhere.parquet"]}},
    {"_runs/run-1.json": {"files": ["/etc/passwd.parquet"]}},
    {"_runs/run-1.json": {"files": ["sub/dir.parquet"]}},
])
def test_a_forged_ledger_cannot_point_the_report_outside_the_output(output, tmp_path, capsys, forge):
    forged = tmp_path / "forged"
    shutil.copytree(output, forged)
    outside = tmp_path / "elsewhere.parquet"
    shutil.copy(next(output.glob("*.parquet")), outside)
    (name, change), = forge.items()
    (forged / name).write_text(json.dumps(dict(json.loads((forged / name).read_text()), **change)))
    capsys.readouterr()
    assert report.main(["--input", str(forged), "--output", str(tmp_path / "r.html"), "--no-frames"]) == 2
    assert "which no run writes" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_a_run_id_with_a_path_in_it_is_refused(output, tmp_path, capsys):
    assert report.main(["--input", str(output), "--output", str(tmp_path / "r.html"), "--run-id", "../run-1"]) == 2
    assert "which no run writes" in capsys.readouterr().err
