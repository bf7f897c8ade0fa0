#!/usr/bin/env python3
"""transformers' side of benches/model.rs, on the same model, prompt and shapes: vision
encode per tile, prefill of the photo prompt, and one decode step at batch 1 and 8 with a
512-token context; and the time to the first token of the photo request as a user of the
library gets it (processor, then `generate` of one token: preprocessing, all 13 tiles,
prefill). Prints JSON (seconds, medians of repeated runs).

  python scripts/bench_transformers.py MODEL_DIR [--threads 2]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache

REPO = Path(__file__).resolve().parent.parent
DECODE_CONTEXT = 512
TILE_BATCH = 4  # as benches/model.rs


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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Can you describe this image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    photo = Image.open(REPO / "tests" / "fixtures" / "images" / "photo.png")
    inputs = processor(text=prompt, images=[[photo]], return_tensors="pt")
    pixels = inputs["pixel_values"]
    tiles = min(TILE_BATCH, pixels.shape[1])

    one_tile = median_time(lambda: model.model.get_image_features(pixels[:, :1]), args.repeats)
    all_tiles = median_time(lambda: model.model.get_image_features(pixels[:, :tiles]), max(1, args.repeats // 2))

    features = model.model.get_image_features(pixels).pooler_output
    embeds = model.model.inputs_merger(inputs["input_ids"], model.get_input_embeddings()(inputs["input_ids"]), torch.cat(features))
    text = model.model.text_model

    def prefill():
        hidden = text(inputs_embeds=embeds, use_cache=True).last_hidden_state
        return model.lm_head(hidden[:, -1:])

    prefill_s = median_time(prefill, args.repeats)

    def first_token():
        inputs = processor(text=prompt, images=[[photo]], return_tensors="pt")
        model.generate(**inputs, max_new_tokens=1, do_sample=False)

    # The first call is the warm-up: one timed run (each is ~20 s here).
    ttft_s = median_time(first_token, 1)

    # The machine's f32 GEMM roofline, as torch (MKL) reaches it at this thread count.
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm_s = median_time(lambda: a @ b, args.repeats)
    vision_cfg = model.config.vision_config
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    vision_params = sum(p.numel() for p in model.model.vision_model.parameters())
    # The work, as MFU counts it: 2 FLOPs per multiply-add of every matrix product, the
    # attention's included (its products grow with the square of the rows: 18% of a tile's).
    def matrix_params(module, skip):
        return sum(p.numel() for name, p in module.named_parameters() if p.dim() >= 2 and skip not in name)

    vision_gflop = (2 * matrix_params(model.model.vision_model, "position_embedding") * patches
                    + vision_cfg.num_hidden_layers * 4 * patches**2 * vision_cfg.hidden_size) / 1e9
    text_cfg, tokens = model.config.text_config, inputs["input_ids"].shape[1]
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    # Causal: query i against i + 1 keys, about n²/2 scores per head, each two products.
    prefill_gflop = (2 * matrix_params(text, "embed_tokens") * tokens
                     + text_cfg.num_hidden_layers * 2 * tokens**2 * text_cfg.num_attention_heads * head_dim
                     + 2 * model.lm_head.weight.numel()) / 1e9

    decode = {}
    for batch in (1, 8):
        context = (torch.arange(DECODE_CONTEXT) % 500 + 200).repeat(batch, 1)
        cache = DynamicCache(config=model.config.text_config)
        text(input_ids=context, cache=cache, use_cache=True)
        token = torch.full((batch, 1), 100)
        position = torch.full((batch, 1), DECODE_CONTEXT)

        def step():
            hidden = text(input_ids=token, cache=cache, position_ids=position, use_cache=True).last_hidden_state
            logits = model.lm_head(hidden)
            cache.crop(-1)  # back to the 512-token context for the next run
            return logits

        decode[batch] = median_time(step, args.repeats * 4)

    print(
        json.dumps(
            {
                "tiles": tiles,
                "gemm_gflops": 2 * n**3 / gemm_s / 1e9,
                "vision_params": vision_params,
                "vision_gflop_per_tile": vision_gflop,
                "prefill_gflop": prefill_gflop,
                "patches_per_tile": patches,
                "prompt_tokens": inputs["input_ids"].shape[1],
                "vision_one_tile_s": one_tile,
                "vision_all_tiles_s": all_tiles,
                "vision_per_tile_s": all_tiles / tiles,
                "prefill_s": prefill_s,
                "ttft_photo_s": ttft_s,
                "prefill_tokens_per_s": inputs["input_ids"].shape[1] / prefill_s,
                "decode_step_batch1_s": decode[1],
                "decode_step_batch8_s": decode[8],
                "decode_tokens_per_s_batch1": 1 / decode[1],
                "decode_tokens_per_s_batch8": 8 / decode[8],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
