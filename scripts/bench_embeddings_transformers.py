#!/usr/bin/env python3
"""transformers' side of benches/embeddings.rs: images and texts embedded per second at the
same batch, with `get_image_features` and `get_text_features` on the same model and inputs
(the fixture images through the model's processor; the same captions, padded to the batch's
longest for CLIP and to 64 for SigLIP, as its model card asks). Prints one JSON line.

  python scripts/bench_embeddings_transformers.py MODEL_DIR [--batch 32] [--threads 2]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

import fixtures_embeddings

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = [
    "two red squares",
    "a blue triangle on the left",
    "the digit 7",
    "a small green circle at the top right of the picture",
    "three yellow stars next to each other",
    "a photo of a cat sitting on a wooden chair in the sun",
]


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    images = [Image.open(REPO / "tests" / "fixtures" / "images" / f"embed-{i}.png") for i in range(4)]
    images = [images[i % 4] for i in range(args.batch)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    if AutoConfig.from_pretrained(args.model).model_type == "siglip":
        tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
        ids = torch.tensor(fixtures_embeddings.siglip_ids(tok, texts, 64, pad=1))
        text_inputs = {"input_ids": ids}
    else:
        text_inputs = dict(AutoTokenizer.from_pretrained(args.model)(texts, padding=True, return_tensors="pt"))
    image_s = median_time(lambda: model.get_image_features(pixel_values=pixels), args.repeats)
    text_s = median_time(lambda: model.get_text_features(**text_inputs), args.repeats)
    print(json.dumps({
        "impl": "transformers",
        "batch": args.batch,
        "images_per_s": args.batch / image_s,
        "texts_per_s": args.batch / text_s,
    }))


if __name__ == "__main__":
    main()
