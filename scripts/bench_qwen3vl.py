#!/usr/bin/env python3
"""Qwen3-VL side by side: transformers' vision encoder on one 1024x768 image and its decode
at batch 1 (f32), Ocellus's (`ocellus generate`, which reports the same phases; f32 and
q8_0), and mistral.rs's (PyPI `mistralrs`, when installed: time to first token of the same
image, decode at batch 1), on the same model folder and thread count; prints them and the
ratios as JSON.

    python scripts/bench_qwen3vl.py MODEL_DIR --ocellus target/release/ocellus [--threads 2]

MODEL_DIR: e.g. OUT/models/qwen3vl-2b-random from `make_fixtures.py qwen3vl-big OUT`.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

REPO = Path(__file__).resolve().parent.parent
DECODE_TOKENS = 32


def image_1024x768(path: Path) -> Path:
    photo = Image.open(REPO / "tests/fixtures/images/photo.png").convert("RGB").resize((1024, 768), Image.BICUBIC)
    photo.save(path)
    return path


@torch.no_grad()
def transformers_side(model_dir: Path, image: Path, runs: int) -> dict:
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = processor.image_processor(images=[Image.open(image)], return_tensors="pt")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        times.append(time.perf_counter() - start)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Write a story about the sea."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = processor(text=text, return_tensors="pt")
    generate = lambda n: model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    generate(2)  # warm-up
    start = time.perf_counter()
    generate(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    generate(DECODE_TOKENS + 1)
    many = time.perf_counter() - start
    return {
        "vision_s": statistics.median(times),
        "image_tokens": int(inputs["image_grid_thw"].prod()) // 4,
        "decode_tok_s": DECODE_TOKENS / (many - one),
    }


def ocellus_side(binary: str, model_dir: Path, image: Path, quantize: str | None) -> dict:
    def run(args):
        out = subprocess.run([binary, "generate", "--model", str(model_dir), *args], capture_output=True, text=True, check=True)
        return out.stderr.strip().splitlines()[-1]

    extra = ["--quantize", quantize] if quantize else []
    vision = run(["--image", str(image), "--prompt", "Describe this image.", "--max-tokens", "1", *extra])
    decode = run(["--prompt", "Write a story about the sea.", "--max-tokens", str(DECODE_TOKENS + 1), *extra])
    number = lambda pattern, line: float(re.search(pattern, line).group(1))
    return {
        "vision_s": number(r"vision encode ([0-9.]+) s", vision),
        "decode_tok_s": number(r"\(([0-9.]+) tokens/s\) \| finish", decode),
        "lines": [vision, decode],
    }


def mistralrs_side(model_dir: Path, image: Path) -> dict:
    try:
        import mistralrs  # noqa: F401
    except ImportError:
        return {}
    script = REPO / "scripts/bench_mistralrs.py"
    flags = ["--arch", "Qwen3VL", "--image", str(image), "--decode-tokens", str(DECODE_TOKENS)]
    out = subprocess.run([sys.executable, str(script), str(model_dir), *flags],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--ocellus", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        image = image_1024x768(Path(tmp) / "photo-1024x768.png")
        ours = ocellus_side(args.ocellus, args.model, image, None)
        ours_q8 = ocellus_side(args.ocellus, args.model, image, "q8_0")
        theirs = transformers_side(args.model, image, args.runs)
        mistral = mistralrs_side(args.model, image)
    result = {
        "threads": args.threads,
        "transformers": theirs,
        "ocellus_f32": ours,
        "ocellus_q8_0": ours_q8,
        "mistralrs": mistral,
        "vision_time_ratio": ours["vision_s"] / theirs["vision_s"],
        "decode_ratio_f32": ours["decode_tok_s"] / theirs["decode_tok_s"],
        "decode_ratio_q8_0": ours_q8["decode_tok_s"] / theirs["decode_tok_s"],
    }
    if mistral:
        result["decode_ratio_f32_vs_mistralrs"] = ours["decode_tok_s"] / mistral["decode_tokens_per_s_batch1"]
        result["decode_ratio_q8_0_vs_mistralrs"] = ours_q8["decode_tok_s"] / mistral["decode_tokens_per_s_batch1"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
