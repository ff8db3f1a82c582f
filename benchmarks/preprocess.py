"""Figure 2, preprocess: video frames per second from decoded frames to model inputs.

card:      frame.to_ndarray("rgb24") at full size -> processor(videos=..., text=...)  (the model card)
pipeline:  the same frames resized inside the decoder with the processor's own resize
           (media.resize_frames), shipped as the pipeline ships them (pickle + npz), then the
           processor, whose resize is then a no-op: bit-identical model inputs.
no_resize: the pipeline without the decoder-side resize (full frames shipped).
swscale:   frame.reformat(384x384) straight from YUV in FFmpeg: faster still, but not the
           processor's pixels; its difference is reported, and the pipeline does not use it.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np


def _frames(path: Path, n: int) -> list:
    import av

    with av.open(str(path)) as c:
        return [f for i, f in zip(range(n * 4), c.decode(video=0)) if i % 4 == 0]


def measure(model_dir: str, inputs: dict, n: int = 16, repeats: int = 3, log=print) -> dict:
    from pipeline.batch.stages import pack, unpack
    from pipeline.media.video import resize_frames
    from pipeline.model.preprocess import Preprocessor, video_resize_spec

    pre = Preprocessor(model_dir)
    spec = video_resize_spec(model_dir)
    prompt = pre.prompt_text("video", "Describe this video in detail.")

    def card(frames):
        video = np.stack([f.to_ndarray(format="rgb24") for f in frames])
        return pre.processor(videos=video, text=prompt, return_tensors="pt")["pixel_values_videos"][0].numpy()

    def shipped(video):  # decoder process -> pipe -> npz between stages, as the pipeline does
        return unpack(pack({"frames": pickle.loads(pickle.dumps(video, protocol=5))}))["frames"]

    def pipeline(frames):
        video = resize_frames(np.stack([f.to_ndarray(format="rgb24") for f in frames]), **spec)
        return pre.build("video", shipped(video), "Describe this video in detail.")["pixel_values_videos"]

    def no_resize(frames):
        video = np.stack([f.to_ndarray(format="rgb24") for f in frames])
        return pre.build("video", shipped(video), "Describe this video in detail.")["pixel_values_videos"]

    def swscale(frames):
        video = np.stack([f.reformat(width=spec["width"], height=spec["height"], format="rgb24",
                                     interpolation="BICUBIC").to_ndarray() for f in frames])
        return pre.build("video", shipped(video), "Describe this video in detail.")["pixel_values_videos"]

    ways = {"card": card, "pipeline": pipeline, "no_resize": no_resize, "swscale": swscale}
    sources = {"720p": inputs["short"][0], "1080p": next(iter(inputs["long"].values()))}
    result = {"frames_per_video": n, "target_size": [spec["height"], spec["width"]], "cases": {}}
    for label, path in sources.items():
        frames = _frames(path, n)
        outputs, best = {}, {}
        for _ in range(repeats):  # interleaved; each way's fastest run counts
            for name, fn in ways.items():
                t = time.perf_counter()
                outputs[name] = fn(frames)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        case = {name: {"frames_per_s": round(len(frames) / s, 2)} for name, s in best.items()}
        for name in ("pipeline", "no_resize", "swscale"):
            diff = np.abs(outputs[name] - outputs["card"])
            # model-input units: pixels normalised to [-1, 1], so one 8-bit level is 2/255 = 0.0078
            case[name].update(max_abs_diff=round(float(diff.max()), 4), mean_abs_diff=round(float(diff.mean()), 5),
                              speedup=round(best["card"] / best[name], 2))
        result["cases"][label] = case
        log(f"preprocess {label}: card {case['card']['frames_per_s']} frames/s, pipeline "
            f"{case['pipeline']['frames_per_s']} (x{case['pipeline']['speedup']}, max diff "
            f"{case['pipeline']['max_abs_diff']}), swscale x{case['swscale']['speedup']} "
            f"(mean diff {case['swscale']['mean_abs_diff']}, max {case['swscale']['max_abs_diff']})")
    speedups = [c["pipeline"]["speedup"] for c in result["cases"].values()]
    result["preprocess_speedup"] = round(float(np.exp(np.mean(np.log(speedups)))), 2)
    result["tolerance"] = ("pipeline: bit-identical model inputs (max |diff| 0); swscale: differences above, "
                           "in normalised units where one 8-bit level is 0.0078")
    return result
