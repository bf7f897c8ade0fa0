#!/usr/bin/env python3
"""mistral.rs (PyPI `mistralrs`) on the same model and prompts as benches/model.rs and
benches/serving.rs: time to first token for the 640x480 photo (13 tiles on SmolVLM-256M)
and decode tokens/s at batch 1 (a text prompt, 64 tokens, streamed). Prints JSON.

  python scripts/bench_mistralrs.py MODEL_DIR [--decode-tokens 64] [--arch Idefics3|Qwen3VL] [--image PNG]
Threads: RAYON_NUM_THREADS (mistral.rs runs on candle, as Ocellus does).
"""

import argparse
import base64
import json
import time
from pathlib import Path

from mistralrs import ChatCompletionRequest, ModelDType, MultimodalArchitecture, Runner, Which

REPO = Path(__file__).resolve().parent.parent


def stream_times(runner, messages, max_tokens):
    """Seconds to the first streamed token, and to each one after it."""
    request = ChatCompletionRequest(
        model="default", messages=messages, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stream=True
    )
    start = time.perf_counter()
    stamps = []
    for chunk in runner.send_chat_completion_request(request):
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--arch", default="Idefics3", help="mistralrs.MultimodalArchitecture's name")
    parser.add_argument("--image", type=Path, default=REPO / "tests/fixtures/images/photo.png")
    args = parser.parse_args()
    runner = Runner(
        which=Which.MultimodalPlain(
            model_id=str(args.model), arch=getattr(MultimodalArchitecture, args.arch), dtype=ModelDType.F32
        )
    )
    photo = base64.b64encode(args.image.read_bytes()).decode()
    image_messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{photo}"}},
        {"type": "text", "text": "Can you describe this image?"},
    ]}]
    ttft, _ = stream_times(runner, image_messages, 2)
    text_messages = [{"role": "user", "content": "Tell me a long story about the sea."}]
    stream_times(runner, text_messages, 8)  # warm-up
    _, gaps = stream_times(runner, text_messages, args.decode_tokens)
    gaps = sorted(gaps)
    print(json.dumps({
        "ttft_photo_s": ttft,
        "decode_tokens_per_s_batch1": 1 / gaps[len(gaps) // 2],
    }))


if __name__ == "__main__":
    main()
