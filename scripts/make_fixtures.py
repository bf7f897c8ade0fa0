#!/usr/bin/env python3
"""Builds random-weight SmolVLM models in the real Hugging Face layout and records what
transformers (the reference implementation) computes on them, for Ocellus's parity tests.

  python scripts/make_fixtures.py tiny          # tests/fixtures: two tiny models + references (committed)
  python scripts/make_fixtures.py adapters      # PEFT LoRA adapters of tiny-idefics3 + references (part of tiny)
  python scripts/make_fixtures.py ocellus-adapter  # a LoRA trained by `ocellus finetune`, run in PEFT (part of tiny)
  python scripts/make_fixtures.py ocellus-vision-adapter  # the same on the vision tower, connector and text q/v (part of tiny)
  python scripts/make_fixtures.py ocellus-dpo-adapter  # a LoRA trained by `finetune --method dpo`, run in PEFT (part of tiny)
  python scripts/make_fixtures.py big OUT_DIR   # a SmolVLM-256M-shaped model + references (not committed)
  python scripts/make_fixtures.py qwen3vl       # tests/fixtures: tiny Qwen3-VL + references (part of tiny)
  python scripts/fixtures_tools.py              # tool prompts through Qwen3-VL's template (part of tiny)
  python scripts/fixtures_dpo.py                # TRL's DPOTrainer on tiny-idefics3, 20 steps (LoRA and full)
  python scripts/make_fixtures.py datasets      # the colours set and DPO pairs as hub Parquet datasets (part of tiny)
  python scripts/make_fixtures.py qwen3vl-big OUT_DIR  # the real Qwen3-VL-2B config, random weights (not committed)
  python scripts/make_fixtures.py embeddings    # tests/fixtures: tiny CLIP and SigLIP + references (part of tiny)
  python scripts/make_fixtures.py embeddings-big OUT_DIR  # the real CLIP and SigLIP configs, random weights (not committed)
  python scripts/make_fixtures.py demo-clip-base OUT  # the untrained demo CLIP, for `ocellus finetune --method contrastive`
  python scripts/make_fixtures.py video OUT.mp4 # a 60 s 1280x720 30 fps H.264 video, for benches/video.rs
  python scripts/make_fixtures.py demo-base OUT # the untrained demo model, for `ocellus finetune --method full`

Install (CPU is enough; PyPI's torch is a CUDA build that runs on CPU):
  python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt

Everything is seeded: rerunning gives the same weights, images and references.
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from fixture_messages import image_part, text_part, to_hf_messages, user, video_part
import fixtures_datasets
import fixtures_dpo
import fixtures_embeddings
import fixtures_qwen3vl
import fixtures_tools
import transformers
from transformers import (
    AutoProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

REPO = Path(__file__).resolve().parent.parent
SHARED_REF = REPO.parent / "shared" / "reference" / "smolvlm-256m-instruct"
FIXTURES = REPO / "tests" / "fixtures"
GREEDY_TOKENS = 24
SEED = 1234
# Tiny models' text weights: larger than a trained model's, which keeps greedy outputs
# varied instead of collapsing into one repeated token. (Scaling lm_head, as sometimes
# suggested, changes no argmax: it only multiplies logits and their rounding alike.)
TINY_TEXT_STD = 0.2

# The special tokens SmolVLM's processor and chat template rely on.
IMAGE_TOKENS = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
)


# ---------------------------------------------------------------------------------------
# Tokenizer: the real SmolVLM BPE tokenizer, truncated to a small vocabulary.
# ---------------------------------------------------------------------------------------


def small_tokenizer(vocab_size: int) -> dict:
    """Keeps the first `vocab_size` BPE entries of the real tokenizer (specials, the 256
    byte symbols, then merges by rank) and the merges that stay inside that vocabulary, so
    the result is a genuine byte-level BPE with SmolVLM's pipeline and special tokens."""
    real = json.loads((SHARED_REF / "tokenizer.json").read_text())
    vocab = {tok: i for tok, i in real["model"]["vocab"].items() if i < vocab_size}
    merges = []
    for merge in real["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        if left in vocab and right in vocab and left + right in vocab:
            merges.append([left, right])
    added = [t for t in real["added_tokens"] if t["id"] < 17]
    next_id = vocab_size
    for content in IMAGE_TOKENS:
        entry = next(t for t in real["added_tokens"] if t["content"] == content)
        entry = dict(entry, id=next_id)
        added.append(entry)
        vocab[content] = next_id
        next_id += 1
    tok = copy.deepcopy(real)
    tok["added_tokens"] = added
    tok["model"]["vocab"] = vocab
    tok["model"]["merges"] = merges
    return tok


def write_tokenizer(dst: Path, tok: dict, template: str) -> dict:
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    config = {
        "add_prefix_space": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<end_of_utterance>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": template,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ids


# ---------------------------------------------------------------------------------------
# Test images: small, wide, tall, RGBA, grayscale; smooth shapes plus noise.
# ---------------------------------------------------------------------------------------


def make_images(dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(SEED)

    def rgb(w, h):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], -1)
        noise = rng.randint(-40, 41, size=(h, w, 3))
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        draw.ellipse([w // 5, h // 5, w // 2, h // 2], fill=(250, 30, 30))
        draw.rectangle([w // 2, h // 2, w - 2, h - 2], fill=(20, 40, 220))
        return img

    rgb(40, 30).save(dst / "small.png")
    rgb(300, 80).save(dst / "wide.png")
    rgb(70, 260).save(dst / "tall.png")
    rgba = rgb(120, 90).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 120).astype(np.uint8), (90, 1))
    alpha[:10] = 0  # fully transparent band
    rgba.putalpha(Image.fromarray(alpha, "L"))
    rgba.save(dst / "rgba.png")
    rgb(100, 100).convert("L").save(dst / "gray.png")
    rgb(640, 480).save(dst / "photo.png")


# ---------------------------------------------------------------------------------------
# Test videos: 3 s at 15 fps, 96x72, a ball crossing a gradient. clip.mp4 is lossless
# (H.264 High 4:4:4 in RGB), so every decoder gives the same pixels and the video case can
# be compared to the bit; the others (H.264 4:2:0, VP9 in WebM, an animated GIF) test
# decoding only (clip.ts also as the segment an HLS playlist would make FFmpeg fetch).
# ---------------------------------------------------------------------------------------

VIDEO_FPS = 15
VIDEO_FRAMES = 45


def video_frames(w=96, h=72, n=VIDEO_FRAMES):
    y, x = np.mgrid[0:h, 0:w]
    frames = []
    for t in range(n):
        base = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), np.full_like(x, (t * 5) % 256)], -1)
        img = Image.fromarray(base.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        cx = 8 + t * (w - 16) // (n - 1)
        draw.ellipse([cx - 8, h // 2 - 8, cx + 8, h // 2 + 8], fill=(250, 240, 20))
        draw.rectangle([w - 20 - t // 3, 4, w - 4, 14], fill=(20, 40, 220))
        frames.append(np.asarray(img))
    return frames


def encode_video(path: Path, frames, codec: str, pix_fmt: str, options: dict) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=VIDEO_FPS)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = pix_fmt
        stream.options = options
        stream.thread_count = 1  # deterministic output
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_bench_video(path: Path, seconds: int = 60, w: int = 1280, h: int = 720, fps: int = 30) -> None:
    """A long, large video: a gradient drifting under moving shapes, H.264 4:2:0 as phones
    and screen recorders write it."""
    import av

    y, x = np.mgrid[0:h, 0:w]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for t in range(seconds * fps):
            base = np.stack([(x + 3 * t) % 256, (y + t) % 256, np.full_like(x, (t // fps * 40) % 256)], -1)
            img = Image.fromarray(base.astype(np.uint8), "RGB")
            draw = ImageDraw.Draw(img)
            cx = (t * 7) % w
            draw.ellipse([cx - 60, h // 2 - 60, cx + 60, h // 2 + 60], fill=(250, 240, 20))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_videos(dst: Path) -> None:
    import av

    dst.mkdir(parents=True, exist_ok=True)
    frames = video_frames()
    encode_video(dst / "clip.mp4", frames, "libx264rgb", "rgb24", {"qp": "0", "preset": "veryslow"})
    with av.open(str(dst / "clip.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert all(np.array_equal(a, b) for a, b in zip(frames, decoded)) and len(decoded) == len(frames), "not lossless"
    encode_video(dst / "clip-yuv420.mp4", frames, "libx264", "yuv420p", {"crf": "18"})
    encode_video(dst / "clip.webm", frames, "libvpx-vp9", "yuv420p", {"crf": "20", "b": "0"})
    encode_video(dst / "clip.ts", frames, "libx264", "yuv420p", {"crf": "18"})
    gif = [Image.fromarray(f) for f in frames[::3]]
    gif[0].save(dst / "clip.gif", save_all=True, append_images=gif[1:], duration=200, loop=0)


# ---------------------------------------------------------------------------------------
# Cases: OpenAI-style messages, mapped onto the HF chat-template shape here and in Ocellus.
# ---------------------------------------------------------------------------------------


CASES = {
    "small_nosplit": dict(
        messages=[user(image_part("small"), text_part("Describe this image."))], do_image_splitting=False
    ),
    "wide": dict(messages=[user(image_part("wide"), text_part("What is in this picture?"))]),
    "tall": dict(messages=[user(text_part("Look:"), image_part("tall"), text_part("How tall is it?"))]),
    "rgba": dict(messages=[user(image_part("rgba"), text_part("Which colours do you see?"))]),
    "gray": dict(messages=[user(image_part("gray"), text_part("Is this grayscale?"))]),
    "multi_image": dict(
        messages=[
            user(
                text_part("Compare the first image"),
                image_part("wide"),
                text_part("with the second one"),
                image_part("gray"),
                text_part("and tell me the differences."),
            )
        ]
    ),
    "multi_turn": dict(
        messages=[
            {"role": "system", "content": "You are a careful assistant."},
            user(image_part("rgba"), text_part("What shape is red?")),
            {"role": "assistant", "content": "A circle."},
            {"role": "user", "content": "And the blue one?"},
        ]
    ),
    "text_only": dict(messages=[{"role": "user", "content": "Write a haiku about the sea."}]),
}


# SmolVLM2 only: the model's sampling (1 fps: three frames), and a request's own
# (`fps`/`max_frames` on the part: six frames).
VIDEO_CASES = {
    "video": dict(messages=[user(video_part("clip"), text_part("What happens in this video?"))]),
    "video_dense": dict(
        messages=[user(text_part("Watch:"), video_part("clip", fps=4, max_frames=6), text_part("Where does the ball go?"))]
    ),
}

# The real SmolVLM-256M processor (no weights needed): token ids and pixel hashes, so CI
# checks the real config and tokenizer too. A 640x480 photo is 4x3 tiles + 1 = 832 tokens.
PROCESSOR_CASES = dict(CASES, photo=dict(messages=[user(image_part("photo"), text_part("Can you describe this image?"))]))


def image_paths(messages):
    return [
        p["image_url"]["url"]
        for m in messages
        if not isinstance(m["content"], str)
        for p in m["content"]
        if p["type"] == "image_url"
    ]


def video_paths(messages):
    return [
        (p["video_url"]["url"], {k: v for k, v in p["video_url"].items() if k != "url"})
        for m in messages
        if not isinstance(m["content"], str)
        for p in m["content"]
        if p["type"] == "video_url"
    ]


def load_videos(processor, root: Path, messages):
    """Decodes each video as transformers' apply_chat_template does (SmolVLM's sampling at the
    processor's fps and num_frames, or the part's), with its PyAV loader."""
    from functools import partial

    from transformers.video_utils import load_video

    videos, metadata = [], []
    vp = getattr(processor, "video_processor", None)
    for path, sampling in video_paths(messages):
        pick = partial(vp.sample_frames, num_frames=sampling.get("max_frames", vp.num_frames), fps=sampling.get("fps", vp.fps))
        video, meta = load_video(str(root / path), backend="pyav", sample_indices_fn=pick)
        videos.append(video)
        metadata.append(meta)
    return videos, metadata


def pil_image_processor(processor, model_dir: Path):
    """transformers 5 picks the torchvision image backend when torchvision is installed (it
    is, for videos): the image references stay on the PIL backend, which Ocellus mirrors."""
    from transformers import AutoImageProcessor

    processor.image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    return processor


def pixel_levels(pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixel values are ((u8 * rescale) - 0.5) / 0.5 in f32: storing the u8 levels is lossless
    and four times smaller. Checked here, so the test's decoding gives back the exact floats."""
    levels = torch.round((pixel_values.double() + 1.0) * 127.5).to(torch.uint8)
    decoded = ((levels.double() * 0.00392156862745098).float() - 0.5) / 0.5
    assert torch.equal(decoded, pixel_values.float()), "pixel values are not an affine map of u8 levels"
    return levels.contiguous()


def load_model(model_dir: Path):
    model_cls = {
        "Idefics3ForConditionalGeneration": Idefics3ForConditionalGeneration,
        "SmolVLMForConditionalGeneration": SmolVLMForConditionalGeneration,
    }[json.loads((model_dir / "config.json").read_text())["architectures"][0]]
    return model_cls.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def record(model_dir: Path, images_root: Path, cases: dict, out: Path, store_pixels: bool = True, model=None) -> None:
    """Runs transformers on every case and writes <out>.json (ids, tokens) and
    <out>.safetensors (pixel values, first-step logits). `model`: one already loaded (a
    PEFT model with its adapter), else the folder's."""
    processor = pil_image_processor(AutoProcessor.from_pretrained(model_dir), model_dir)
    model = model if model is not None else load_model(model_dir)
    eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    results, tensors = {}, {}
    for name, case in cases.items():
        prompt = processor.apply_chat_template(to_hf_messages(case["messages"]), add_generation_prompt=True)
        images = [Image.open(images_root / p) for p in image_paths(case["messages"])]
        kwargs = {}
        if "do_image_splitting" in case:
            kwargs["do_image_splitting"] = case["do_image_splitting"]
        videos, video_meta = load_videos(processor, images_root, case["messages"])
        if videos:
            kwargs.update(videos=videos, video_metadata=video_meta, do_sample_frames=False)
        inputs = processor(text=prompt, images=[images] if images else None, return_tensors="pt", **kwargs)
        result = model.generate(
            **inputs,
            max_new_tokens=GREEDY_TOKENS,
            min_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            output_logits=True,
            return_dict_in_generate=True,
        )
        logits = result.logits[0][0].float()  # raw first-step logits, before min_new_tokens masks eos
        generated = result.sequences[0, inputs["input_ids"].shape[1] :]
        results[name] = {
            "messages": case["messages"],
            "do_image_splitting": case.get("do_image_splitting", True),
            "prompt": prompt,
            "input_ids": inputs["input_ids"][0].tolist(),
            "greedy_tokens": generated.tolist(),
        }
        tensors[f"{name}.logits"] = logits.contiguous()
        if images and store_pixels:
            tensors[f"{name}.pixel_levels"] = pixel_levels(inputs["pixel_values"][0])
        if videos:
            # Frames are normalised as (x - 127.5) / 127.5 in f32, not as images are: kept raw.
            tensors[f"{name}.pixel_values"] = inputs["pixel_values"][0].float().contiguous()
            results[name]["frame_indices"] = [[int(i) for i in m.frames_indices] for m in video_meta]
        print(f"  {name}: {len(results[name]['input_ids'])} prompt tokens, generated {generated.tolist()[:8]}...")
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "greedy_tokens": GREEDY_TOKENS}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cases": results}, indent=1))
    save_file(tensors, str(out.with_suffix(".safetensors")))


def record_processor(processor_dir: Path, images_root: Path, cases: dict, out: Path) -> None:
    """Token ids and a sha256 of the f32 pixel values (little-endian) per case."""
    import hashlib

    processor = pil_image_processor(AutoProcessor.from_pretrained(processor_dir), processor_dir)
    results = {}
    for name, case in cases.items():
        prompt = processor.apply_chat_template(to_hf_messages(case["messages"]), add_generation_prompt=True)
        images = [Image.open(images_root / p) for p in image_paths(case["messages"])]
        kwargs = {"do_image_splitting": case["do_image_splitting"]} if "do_image_splitting" in case else {}
        inputs = processor(text=prompt, images=[images] if images else None, return_tensors="pt", **kwargs)
        entry = {
            "messages": case["messages"],
            "do_image_splitting": case.get("do_image_splitting", True),
            "prompt": prompt,
            "input_ids": inputs["input_ids"][0].tolist(),
        }
        if images:
            pixels = inputs["pixel_values"][0].float().contiguous().numpy()
            entry["pixel_shape"] = list(pixels.shape)
            entry["pixel_sha256"] = hashlib.sha256(pixels.astype("<f4").tobytes()).hexdigest()
        results[name] = entry
        print(f"  processor {name}: {len(entry['input_ids'])} tokens")
    meta = {"transformers": transformers.__version__, "processor": str(processor_dir.name)}
    out.write_text(json.dumps({"meta": meta, "cases": results}, indent=1))


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def randomize(model, seed: int, text_std: float):
    """Tiny models: all weights drawn afresh (see TINY_TEXT_STD)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, text_std if "text_model.layers" in name else 0.08)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or "layer_norm" in name or name.endswith("norm.weight"):
                p.add_(1.0)
    return model.float()


def tiny_config(cls, ids: dict, vocab: int, tie: bool):
    cfg = cls.from_pretrained(SHARED_REF) if cls is Idefics3Config else cls(**json.loads((SHARED_REF / "config.json").read_text()))
    cfg.vision_config.update(
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8)
    )
    cfg.text_config.update(
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=vocab,
            dtype="float32",
        )
    )
    cfg.vocab_size = vocab
    cfg.scale_factor = 2
    cfg.image_token_id = ids["<image>"]
    cfg.tie_word_embeddings = tie
    cfg.text_config.tie_word_embeddings = tie
    cfg.dtype = "float32"
    return cfg


TEMPLATE = json.loads((SHARED_REF / "chat_template.json").read_text())["chat_template"]
PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_image_splitting": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Idefics3ImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "max_image_size": {"longest_edge": 64},
    "processor_class": "Idefics3Processor",
    "resample": 1,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 256},
}


def hub_era_config(model_dir: Path) -> None:
    """Rewrites what transformers 5 saved into the layout of real hub folders (4.x era):
    rope_theta instead of rope_parameters, flat processor files, chat_template.json."""
    cfg = json.loads((model_dir / "config.json").read_text())
    text = cfg["text_config"]
    rope = text.pop("rope_parameters", None) or {}
    text["rope_theta"] = rope.get("rope_theta", 100000)
    text["rope_scaling"] = None
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def build_tiny_idefics3(dst: Path) -> None:
    """SmolVLM v1 architecture, hub-era file layout, untied head, one safetensors file."""
    tok = small_tokenizer(1024)
    dst.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(dst, tok, TEMPLATE)
    vocab = 1088
    model = randomize(Idefics3ForConditionalGeneration(tiny_config(Idefics3Config, ids, vocab, tie=False)), SEED, TINY_TEXT_STD)
    model.save_pretrained(dst)
    hub_era_config(dst)
    (dst / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (dst / "processor_config.json").write_text(json.dumps({"image_seq_len": 16, "processor_class": "Idefics3Processor"}))
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    gen = {"bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<end_of_utterance>"], "pad_token_id": 2}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))


def build_tiny_smolvlm2(dst: Path) -> None:
    """SmolVLM2 architecture as transformers 5 saves it: rope_parameters, nested
    processor_config.json, chat_template.jinja, tied embeddings, sharded weights."""
    tok = small_tokenizer(1024)
    dst.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(dst, tok, TEMPLATE)
    # SmolVLM2's processor files: as the real ones, `size` (256 here, 2048 there) is also the
    # size frames are resized to before they are squashed into a tile.
    preprocessor = dict(
        PREPROCESSOR,
        image_processor_type="SmolVLMImageProcessor",
        processor_class="SmolVLMProcessor",
        video_sampling={"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 64}},
    )
    (dst / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    (dst / "processor_config.json").write_text(json.dumps({"image_seq_len": 16, "processor_class": "SmolVLMProcessor"}))
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    processor = AutoProcessor.from_pretrained(dst)
    for f in ["preprocessor_config.json", "processor_config.json", "chat_template.json"]:
        (dst / f).unlink()
    processor.save_pretrained(dst)
    cfg = tiny_config(SmolVLMConfig, ids, 1088, tie=True)
    cfg.architectures = ["SmolVLMForConditionalGeneration"]
    model = randomize(SmolVLMForConditionalGeneration(cfg), SEED + 1, TINY_TEXT_STD)
    model.save_pretrained(dst, max_shard_size="300KB")
    gen = {"bos_token_id": ids["<|im_start|>"], "eos_token_id": [ids["<end_of_utterance>"]], "pad_token_id": 2}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))


def build_demo_base(dst: Path) -> None:
    """The untrained demo model: SmolVLM's architecture at a few MB (64-pixel images, one
    tile of 16 tokens), transformers' own initialisation, for `ocellus finetune --method
    full` to train on `ocellus demo-data` (see the README)."""
    tok = small_tokenizer(1024)
    dst.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(dst, tok, TEMPLATE)
    cfg = tiny_config(Idefics3Config, ids, 1088, tie=True)
    cfg.vision_config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2))
    cfg.text_config.update(
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    )
    torch.manual_seed(SEED + 7)
    Idefics3ForConditionalGeneration(cfg).float().save_pretrained(dst)
    preprocessor = dict(PREPROCESSOR, do_image_splitting=False, size={"longest_edge": 64})
    (dst / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (dst / "processor_config.json").write_text(json.dumps({"image_seq_len": 16, "processor_class": "Idefics3Processor"}))
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    gen = {"bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<end_of_utterance>"], "pad_token_id": 2}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))


def build_big(dst: Path) -> None:
    """SmolVLM-256M-Instruct's real config, tokenizer and processor files with random weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in SHARED_REF.iterdir():
        if f.suffix in (".json", ".txt") and f.name != "SOURCES.md":
            shutil.copy(f, dst / f.name)
    cfg = Idefics3Config.from_pretrained(SHARED_REF)
    # transformers' own initialisation keeps 30 layers well conditioned (larger random
    # weights amplify float rounding from layer to layer).
    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(cfg)
    model.to(torch.bfloat16).save_pretrained(dst)
    hub_era_config(dst)
    # save_pretrained rewrote generation_config.json from the model config; restore the real one.
    shutil.copy(SHARED_REF / "generation_config.json", dst / "generation_config.json")
    shutil.copy(SHARED_REF / "config.json", dst / "config.json")


# ---------------------------------------------------------------------------------------
# LoRA adapters: trained by Hugging Face PEFT on the tiny model, for Ocellus's adapter parity
# ---------------------------------------------------------------------------------------

TEXT_LINEAR = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Three shapes of PEFT config users meet: every text projection by regex; a module list
# (which would also match SigLIP's q/v, hence exclude_modules) with per-module rank and alpha
# (a k gap inside the fused qkv); rsLoRA on two MLP projections and the lm_head.
ADAPTERS = {
    "all-linear-r4": dict(r=4, lora_alpha=8, target_modules=TEXT_LINEAR, lora_dropout=0.05),
    "attn-r8": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=r".*vision_model.*",
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 32},
    ),
    "mlp-rslora": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=r".*text_model.*\.(gate_proj|down_proj)|lm_head"),
    # The vision tower and connector (issue 25): every SigLIP projection and the connector by
    # regex, the text model untouched; and a plain list whose names match in both towers
    # (q_proj, v_proj: a k gap in each fused qkv) and the connector (`proj`), with a rank
    # pattern on one vision layer.
    "vision-r4": dict(
        r=4,
        lora_alpha=8,
        target_modules=r".*vision_model.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)|model\.connector\.modality_projection\.proj",
    ),
    "vision-text-r8": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "proj"],
        rank_pattern={"vision_model.encoder.layers.1.self_attn.v_proj": 2},
    ),
}
# Each adapter learns its own answers to the fixture images, so their outputs differ from
# the base model's and from each other's.
ADAPTER_ANSWERS = {
    "all-linear-r4": "A red circle next to a blue square.",
    "attn-r8": "Yes, I see it.",
    "mlp-rslora": "Three shapes on a white background.",
    "vision-r4": "A picture of colours.",
    "vision-text-r8": "I see a shape.",
}
ADAPTER_STEPS = 40


def sft_batch(processor, messages, answer):
    """One chat with its assistant answer: input ids, pixel values and labels that count
    only the answer's tokens (as TRL's SFT does for VLMs)."""
    images = [Image.open(FIXTURES / p) for p in image_paths(messages)]
    prompt = processor.apply_chat_template(to_hf_messages(messages), add_generation_prompt=True)
    full = prompt + " " + answer + "<end_of_utterance>"
    kwargs = dict(images=[images] if images else None, return_tensors="pt")
    prompt_len = processor(text=prompt, **kwargs)["input_ids"].shape[1]
    inputs = processor(text=full, **kwargs)
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_len] = -100
    return dict(inputs, labels=labels)


def train_adapter(model_dir: Path, name: str, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    processor = pil_image_processor(AutoProcessor.from_pretrained(model_dir), model_dir)
    model = get_peft_model(load_model(model_dir), LoraConfig(**ADAPTERS[name]))
    batches = [sft_batch(processor, CASES[c]["messages"], ADAPTER_ANSWERS[name]) for c in ["wide", "tall", "rgba", "gray"]]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for step in range(ADAPTER_STEPS):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    print(f"  {name}: loss {loss.item():.3f} after {ADAPTER_STEPS} steps")
    return model.eval()


def make_adapters(model_dir: Path, out_dir: Path, refs: Path, only: list) -> None:
    """Trains each adapter (or those in `only`), saves it in PEFT's format and records
    transformers+PEFT's greedy tokens and logits on the fixture cases."""
    base = json.loads((refs / f"{model_dir.name}.json").read_text())["cases"]
    for i, name in enumerate(ADAPTERS):
        if only and name not in only:
            continue
        model = train_adapter(model_dir, name, SEED + 10 + i)
        dst = out_dir / name
        shutil.rmtree(dst, ignore_errors=True)
        # lm_head is named like an embedding: PEFT would save the whole base matrix too.
        model.save_pretrained(dst, save_embedding_layers=False)
        (dst / "README.md").unlink(missing_ok=True)
        config = json.loads((dst / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = model_dir.name  # not this machine's path
        (dst / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        out = refs / f"{model_dir.name}-lora-{name}"
        record(model_dir, FIXTURES, CASES, out, store_pixels=False, model=model)
        cases = json.loads(out.with_suffix(".json").read_text())["cases"]
        same = [c for c in cases if cases[c]["greedy_tokens"] == base[c]["greedy_tokens"]]
        if name == "vision-r4":  # the text model is the base's: a text prompt is answered alike
            assert same == ["text_only"], same
            continue
        assert not same, f"{name} leaves {same} as the base model answers them"


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
FINETUNE = FIXTURES / "finetune" / "colours"
OCELLUS_ADAPTER = "ocellus-colours"


def make_colours(dst: Path) -> None:
    """A tiny fine-tuning set: solid-colour images, "What colour is this?", the colour."""
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "images").mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    names = list(COLOURS)
    for split, n in [("train", 48), ("eval", 16)]:
        lines = []
        for i in range(n):
            colour = names[rng.integers(len(names))]
            path = f"images/{split}-{i}.png"
            Image.new("RGB", (40, 30), COLOURS[colour]).save(dst / path)
            question = user(
                {"type": "image_url", "image_url": {"url": path}}, text_part("What colour is this?")
            )
            lines.append(json.dumps({"messages": [question, {"role": "assistant", "content": f"{colour}."}]}))
        (dst / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


# What `ocellus finetune` adapts in each adapter it trains for the round trip: the text
# model's projections and head; and the vision tower's projections and the connector with
# the text model's q and v (a LoRA on both sides of the image features).
OCELLUS_TARGETS = {
    OCELLUS_ADAPTER: "q_proj,v_proj,gate_proj,down_proj,lm_head",
    "ocellus-vision": "vision.q_proj,vision.v_proj,vision.out_proj,vision.fc1,vision.fc2,connector,q_proj,v_proj",
}


def make_ocellus_adapter(model_dir: Path, refs: Path, name: str = OCELLUS_ADAPTER) -> None:
    """Trains a LoRA with `ocellus finetune` (OCELLUS names the binary; else cargo runs it),
    then records what transformers+PEFT compute with it: Ocellus's tests check that Ocellus
    serves the same tokens, which closes the round trip Ocellus -> PEFT -> Ocellus."""
    import subprocess

    from peft import PeftModel

    make_colours(FINETUNE)
    dst = FIXTURES / "adapters" / model_dir.name / name
    shutil.rmtree(dst, ignore_errors=True)
    binary = [os.environ["OCELLUS"]] if "OCELLUS" in os.environ else ["cargo", "run", "-q", "--"]
    flags = ["finetune", "--model", str(model_dir), "--data", str(FINETUNE / "train.jsonl")]
    flags += ["--eval", str(FINETUNE / "eval.jsonl"), "--out", str(dst), "--epochs", "3", "--lr", "1e-3"]
    flags += ["--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", OCELLUS_TARGETS[name]]
    subprocess.run(binary + flags, check=True, cwd=REPO)
    model = PeftModel.from_pretrained(load_model(model_dir), dst).eval()
    modules = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    print(f"  PEFT placed {len(modules)} LoRA pairs, {sum('vision_model' in m for m in modules)} in the vision tower")
    record(model_dir, FIXTURES, CASES, refs / f"{model_dir.name}-lora-{name}", store_pixels=False, model=model)


def make_ocellus_dpo_adapter(model_dir: Path, refs: Path) -> None:
    """Trains a LoRA with `ocellus finetune --method dpo` (the flags of fixtures_dpo.py's
    LoRA run, from its initial adapter), then records what transformers+PEFT compute with
    it: tests/lora.rs checks that Ocellus serves the same logits and greedy tokens."""
    import subprocess

    from peft import PeftModel

    dpo = FIXTURES / "finetune" / "dpo"
    dst = FIXTURES / "adapters" / model_dir.name / "ocellus-dpo"
    shutil.rmtree(dst, ignore_errors=True)
    binary = [os.environ["OCELLUS"]] if "OCELLUS" in os.environ else ["cargo", "run", "-q", "--"]
    flags = ["finetune", "--method", "dpo", "--model", str(model_dir), "--data", str(dpo / "pairs.jsonl")]
    flags += ["--out", str(dst), "--lora-init", str(dpo / "init-lora"), "--lora-r", "8", "--lora-alpha", "16"]
    flags += ["--lora-dropout", "0", "--lr", "2e-3", "--beta", "0.1", "--batch-size", "4", "--epochs", "20", "--max-steps", "20"]
    subprocess.run(binary + flags, check=True, cwd=REPO)
    model = PeftModel.from_pretrained(load_model(model_dir), dst).eval()
    record(model_dir, FIXTURES, CASES, refs / f"{model_dir.name}-lora-ocellus-dpo", store_pixels=False, model=model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("tiny")
    adapters = sub.add_parser("adapters")
    adapters.add_argument("--only", nargs="*", default=[], choices=list(ADAPTERS))
    sub.add_parser("ocellus-adapter")
    sub.add_parser("ocellus-vision-adapter")
    sub.add_parser("ocellus-dpo-adapter")
    demo = sub.add_parser("demo-base")
    demo.add_argument("out", type=Path)
    big = sub.add_parser("big")
    big.add_argument("out", type=Path)
    sub.add_parser("qwen3vl")
    qwen_big = sub.add_parser("qwen3vl-big")
    qwen_big.add_argument("out", type=Path)
    sub.add_parser("embeddings")
    sub.add_parser("datasets")
    clip_base = sub.add_parser("demo-clip-base")
    clip_base.add_argument("out", type=Path)
    embed_big = sub.add_parser("embeddings-big")
    embed_big.add_argument("out", type=Path)
    video = sub.add_parser("video")
    video.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.what == "video":
        return make_bench_video(args.out)

    if args.what == "demo-base":
        return build_demo_base(args.out)

    if args.what == "qwen3vl":
        return fixtures_qwen3vl.make_tiny(FIXTURES)

    if args.what == "qwen3vl-big":
        return fixtures_qwen3vl.make_big(args.out, FIXTURES)

    if args.what == "demo-clip-base":
        return fixtures_embeddings.make_demo_clip_base(args.out)

    if args.what == "datasets":
        return fixtures_datasets.main()

    if args.what == "embeddings":
        return fixtures_embeddings.make_tiny(FIXTURES)

    if args.what == "embeddings-big":
        return fixtures_embeddings.make_big(args.out, FIXTURES)

    if args.what == "ocellus-adapter":
        return make_ocellus_adapter(FIXTURES / "models" / "tiny-idefics3", FIXTURES / "reference")

    if args.what == "ocellus-vision-adapter":
        return make_ocellus_adapter(FIXTURES / "models" / "tiny-idefics3", FIXTURES / "reference", "ocellus-vision")

    if args.what == "ocellus-dpo-adapter":
        return make_ocellus_dpo_adapter(FIXTURES / "models" / "tiny-idefics3", FIXTURES / "reference")

    if args.what == "adapters":
        return make_adapters(FIXTURES / "models" / "tiny-idefics3", FIXTURES / "adapters" / "tiny-idefics3", FIXTURES / "reference", args.only)

    images = FIXTURES / "images"
    make_images(images)
    make_videos(FIXTURES / "videos")
    if args.what == "tiny":
        models = FIXTURES / "models"
        refs = FIXTURES / "reference"
        for d in [models, refs]:
            d.mkdir(parents=True, exist_ok=True)
        for name, build, cases in [
            ("tiny-idefics3", build_tiny_idefics3, CASES),
            (
                "tiny-smolvlm2",
                build_tiny_smolvlm2,
                dict({k: CASES[k] for k in ["wide", "multi_image", "text_only"]}, **VIDEO_CASES),
            ),
        ]:
            shutil.rmtree(models / name, ignore_errors=True)
            build(models / name)
            print(f"{name}: recording transformers {transformers.__version__}")
            record(models / name, FIXTURES, cases, refs / name, store_pixels=name == "tiny-idefics3")
        record_processor(SHARED_REF, FIXTURES, PROCESSOR_CASES, refs / "smolvlm-256m-processor.json")
        make_adapters(models / "tiny-idefics3", FIXTURES / "adapters" / "tiny-idefics3", refs, [])
        make_ocellus_adapter(models / "tiny-idefics3", refs)
        make_ocellus_adapter(models / "tiny-idefics3", refs, "ocellus-vision")
        fixtures_qwen3vl.make_tiny(FIXTURES)
        fixtures_tools.main()
        fixtures_dpo.main()
        make_ocellus_dpo_adapter(models / "tiny-idefics3", refs)
        fixtures_datasets.main()
        fixtures_embeddings.make_tiny(FIXTURES)
    else:
        # Same layout as tests/fixtures, so the parity test runs on either root.
        model_dir = args.out / "models" / "smolvlm-256m-random"
        shutil.rmtree(model_dir, ignore_errors=True)
        build_big(model_dir)
        shutil.copytree(images, args.out / "images", dirs_exist_ok=True)
        (args.out / "reference").mkdir(exist_ok=True)
        print(f"smolvlm-256m-random: recording transformers {transformers.__version__}")
        record(model_dir, args.out, CASES, args.out / "reference" / "smolvlm-256m-random")


if __name__ == "__main__":
    sys.exit(main())
