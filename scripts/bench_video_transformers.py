#!/usr/bin/env python3
"""The baseline of benches/video.rs: transformers' SmolVLM2 video pipeline on the same video
and the same preprocessor config (PyAV decoding, SmolVLMVideoProcessor on torchvision).

  python scripts/bench_video_transformers.py /tmp/bench720.mp4 [runs]
"""

import sys
import time
from functools import partial
from pathlib import Path

import torch
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
from transformers.video_utils import load_video
import json

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO.parent / "shared/reference/smolvlm2-500m-video-instruct/inferred-not-directly-seen/preprocessor_config.json"


def main() -> None:
    video = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(2)
    processor = SmolVLMVideoProcessor(**json.loads(CONFIG.read_text()))
    pick = partial(processor.sample_frames, num_frames=processor.num_frames, fps=processor.fps)
    decode, preprocess = [], []
    for _ in range(runs):
        start = time.perf_counter()
        frames, meta = load_video(video, backend="pyav", sample_indices_fn=pick)
        decode.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = processor(videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
        preprocess.append(time.perf_counter() - start)
    median = lambda xs: sorted(xs)[len(xs) // 2]
    print(f"{video}: sampled {len(meta.frames_indices)} frames, pixel_values {tuple(out['pixel_values'].shape)}")
    print(f"decode + sample: {median(decode):.3f} s (median of {runs})")
    print(f"preprocess:      {median(preprocess):.3f} s")
    print(f"total:           {median(decode) + median(preprocess):.3f} s")


if __name__ == "__main__":
    main()
