"""Figure 1, decode: sampled frames per second, ours (pipeline.media, seeking by the container
index) vs the model card's decode-everything-up-to-the-last-index, for 8/16/32 frames from short
720p clips and long 1080p videos (2 s and 10 s keyframe intervals). torchcodec is measured as a
peer when it loads (it needs the system's FFmpeg libraries)."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.baseline import card_decode_timed_pass

COUNTS = (8, 16, 32)


def ours(path: Path, n: int) -> dict:
    from pipeline.config import StorageConfig
    from pipeline.media.fetch import fetch_and_decode

    t = time.perf_counter()
    d = fetch_and_decode(str(path), StorageConfig(), "video", n)
    return {"decode_s": time.perf_counter() - t, "decoded_frames": d.decoded_frames, "sampled_frames": len(d.frames),
            "targets_s": d.timestamps_s}


def torchcodec_peer(path: Path, n: int) -> dict:
    """torchcodec's exact seek mode, at our uniform targets, RGB frames on the CPU."""
    from torchcodec.decoders import VideoDecoder

    from pipeline.media.video import uniform_targets

    t = time.perf_counter()
    dec = VideoDecoder(str(path), seek_mode="exact", device="cpu")
    meta = dec.metadata
    targets = uniform_targets(0.0, meta.duration_seconds, meta.average_fps, n)
    batch = dec.get_frames_played_at(seconds=[float(x) for x in targets])
    batch.data.permute(0, 2, 3, 1).contiguous().numpy()  # to (T, H, W, 3) like the others
    return {"decode_s": time.perf_counter() - t, "sampled_frames": int(batch.data.shape[0])}


def torchcodec_status(path: Path) -> str | None:
    """None when torchcodec decodes here, else why not (it loads FFmpeg's shared libraries lazily)."""
    try:
        torchcodec_peer(path, 1)
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "not a peer here"
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"


def _best(fn, path: Path, n: int, repeats: int) -> dict:
    """The fastest of `repeats` runs: on a shared machine the minimum is the least disturbed."""
    return min((fn(path, n) for _ in range(repeats)), key=lambda r: r["decode_s"])


def _totals(runs: list[dict]) -> dict:
    s = sum(r["decode_s"] for r in runs)
    sampled = sum(r["sampled_frames"] for r in runs)
    out = {"seconds": round(s, 4), "sampled_frames": sampled, "sampled_fps": round(sampled / s, 2)}
    if all("decoded_frames" in r for r in runs):
        out["decoded_per_sampled"] = round(sum(r["decoded_frames"] for r in runs) / sampled, 2)
    return out


def measure(inputs: dict, repeats: int = 3, log=print) -> dict:
    reason = torchcodec_status(inputs["short"][0])
    ours(inputs["short"][0], 8)  # warm-up: imports and first-call costs are not decode speed
    cases = {}
    groups = {"short": inputs["short"], **{f"long_gop{g:g}s": [p] for g, p in inputs["long"].items()}}
    for name, paths in groups.items():
        r = repeats
        # Interleaved repeats (card pass, then ours for every N), keeping each one's fastest:
        # on a shared machine both then see the same spells of load.
        card, mine = {}, {}
        for _ in range(r):
            for p in paths:
                timed = card_decode_timed_pass(str(p), list(COUNTS))
                for n in COUNTS:
                    if (p, n) not in card or timed[n]["decode_s"] < card[p, n]["decode_s"]:
                        card[p, n] = timed[n]
                    run = ours(p, n)
                    if (p, n) not in mine or run["decode_s"] < mine[p, n]["decode_s"]:
                        mine[p, n] = run
        for n in COUNTS:
            case = {"ours": _totals([mine[p, n] for p in paths]), "card": _totals([card[p, n] for p in paths])}
            if reason is None:
                case["torchcodec"] = _totals([_best(torchcodec_peer, p, n, r) for p in paths])
            case["speedup"] = round(case["ours"]["sampled_fps"] / case["card"]["sampled_fps"], 2)
            if "torchcodec" in case:
                case["torchcodec_vs_ours"] = round(case["torchcodec"]["sampled_fps"] / case["ours"]["sampled_fps"], 2)
            cases[f"{name}/{n}"] = case
            log(f"decode {name} N={n}: ours {case['ours']['sampled_fps']} fps "
                f"({case['ours'].get('decoded_per_sampled')} decoded/sampled), card {case['card']['sampled_fps']} fps "
                f"({case['card'].get('decoded_per_sampled')}), x{case['speedup']}"
                + (f", torchcodec x{case['torchcodec_vs_ours']} of ours" if "torchcodec" in case else ""))
    long_cases = [c for k, c in cases.items() if k.startswith("long")]
    short_cases = [c for k, c in cases.items() if k.startswith("short")]
    result = {
        "cases": cases,
        "decode_speedup_long": _geomean([c["speedup"] for c in long_cases]),
        "decode_speedup_long_min": min(c["speedup"] for c in long_cases),
        "decode_speedup_short": _geomean([c["speedup"] for c in short_cases]),
        "decode_speedup_short_min": min(c["speedup"] for c in short_cases),
        "torchcodec": "measured" if reason is None else f"not measured: {reason}",
    }
    if reason is None:
        result["torchcodec_vs_ours"] = _geomean([c["torchcodec_vs_ours"] for c in cases.values()])
    return result


def _geomean(values: list[float]) -> float:
    import math

    return round(math.exp(sum(math.log(v) for v in values) / len(values)), 2)
