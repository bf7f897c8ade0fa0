"""Qwen3-VL fixtures for make_fixtures.py: a tiny random-weight Qwen3VLForConditionalGeneration
with the real tokenizer (truncated), chat template and processor files, and what transformers
computes on it (ids, grids, pixel values, first-step logits, greedy tokens); and, outside the
repository, one with the real 2B config for benchmarks and the ignored parity test.

Images go through transformers' default image backend (torchvision, as the hub's
`Qwen2VLImageProcessorFast` asks); videos through its Qwen3-VL video processor."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from fixture_messages import image_part, text_part, to_hf_messages, user, video_part
import transformers
from transformers import AutoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration

REPO = Path(__file__).resolve().parent.parent
QWEN_REF = REPO.parent / "shared" / "reference" / "qwen3-vl-2b-instruct"
HUB_TOKENIZER = QWEN_REF / "tokenizer-json-not-byte-exact" / "qwen3-hub-tokenizer.json"
GREEDY_TOKENS = 24
SEED = 4321
TINY_VOCAB = 1024
TINY_TEXT_STD = 0.2


def small_tokenizer(vocab_size: int) -> dict:
    """The first `vocab_size` entries of Qwen3's byte-level BPE (the byte symbols, then merges
    by rank), the merges inside them, and the 26 added tokens renumbered after them."""
    real = json.loads(HUB_TOKENIZER.read_text())
    vocab = {tok: i for tok, i in real["model"]["vocab"].items() if i < vocab_size}
    merges = []
    for merge in real["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        if left in vocab and right in vocab and left + right in vocab:
            merges.append([left, right])
    added = []
    for i, entry in enumerate(sorted(real["added_tokens"], key=lambda t: t["id"])):
        added.append(dict(entry, id=vocab_size + i))
    tok = copy.deepcopy(real)
    tok["added_tokens"] = added
    tok["model"]["vocab"] = vocab
    tok["model"]["merges"] = merges
    return tok


def write_tokenizer(dst: Path, tok: dict) -> dict:
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    config = json.loads((QWEN_REF / "tokenizer_config.json").read_text())
    old = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()}
    config["added_tokens_decoder"] = {str(ids[c]): config["added_tokens_decoder"][str(i)] for c, i in old.items()}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    for name in ["chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json"]:
        shutil.copyfile(QWEN_REF / name, dst / name)
    return ids


def tiny_config(ids: dict) -> Qwen3VLConfig:
    real = json.loads((QWEN_REF / "config.json").read_text())
    real["vision_config"].update(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        deepstack_visual_indexes=[0, 1],
        num_position_embeddings=64,
    )
    real["text_config"].update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=TINY_VOCAB + 64,
        rope_scaling={"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
        dtype="float32",
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    tokens = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    real.update({name: ids[token] for name, token in tokens.items()})
    return Qwen3VLConfig(**real)


def randomize(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, TINY_TEXT_STD if "language_model.layers" in name else 0.08)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model.float()


def hub_layout(dst: Path) -> None:
    """What transformers 5 saved, back in the hub's 4.57 layout: `rope_scaling` and
    `rope_theta` instead of `rope_parameters`; no processor_config.json."""
    cfg = json.loads((dst / "config.json").read_text())
    for section in ["text_config", "vision_config"]:
        part = cfg[section]
        rope = part.pop("rope_parameters", None) or {}
        if section == "text_config":
            part["rope_theta"] = rope.get("rope_theta", 5000000)
            part["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def build_tiny(dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(dst, small_tokenizer(TINY_VOCAB))
    # Native resolution, bounded so that a test image is at most 64 tokens.
    pre = json.loads((QWEN_REF / "preprocessor_config.json").read_text())
    pre["size"] = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}
    (dst / "preprocessor_config.json").write_text(json.dumps(pre, indent=4))
    model = randomize(Qwen3VLForConditionalGeneration(tiny_config(ids)), SEED)
    model.save_pretrained(dst)
    hub_layout(dst)
    gen = json.loads((QWEN_REF / "generation_config.json").read_text())
    gen.update(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    gen["eos_token_id"] = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=4))


def build_big(dst: Path) -> None:
    """The real 2B config (and real tokenizer), random weights, in f32: for benchmarks."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ["config.json", "generation_config.json", "chat_template.json", "preprocessor_config.json",
                 "video_preprocessor_config.json", "tokenizer_config.json", "vocab.json", "merges.txt"]:
        shutil.copyfile(QWEN_REF / name, dst / name)
    shutil.copyfile(HUB_TOKENIZER, dst / "tokenizer.json")
    cfg = Qwen3VLConfig.from_pretrained(dst)
    cfg.text_config.dtype = "float32"
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(cfg).float().eval()
    model.save_pretrained(dst, max_shard_size="2GB")
    for name in ["config.json", "generation_config.json"]:
        shutil.copyfile(QWEN_REF / name, dst / name)


CASES = {
    "small": dict(messages=[user(image_part("small"), text_part("Describe this image."))]),
    "wide": dict(messages=[user(image_part("wide"), text_part("What is in this picture?"))]),
    "tall": dict(messages=[user(text_part("Look:"), image_part("tall"), text_part("How tall is it?"))]),
    "two_images": dict(
        messages=[user(text_part("Compare"), image_part("wide"), text_part("with"), image_part("gray"), text_part("please."))]
    ),
    "max_pixels": dict(
        messages=[user(image_part("photo", max_pixels=32 * 32 * 12), text_part("What is this?"))], max_pixels=32 * 32 * 12
    ),
    "video": dict(messages=[user(video_part("clip"), text_part("What happens in this video?"))]),
    "video_fps": dict(messages=[user(text_part("Watch:"), video_part("clip", fps=4), text_part("Where does the ball go?"))]),
    "multi_turn": dict(
        messages=[
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And another one?"},
        ]
    ),
}


def parts(messages, kind):
    return [p[kind] for m in messages if not isinstance(m["content"], str) for p in m["content"] if p["type"] == kind]


def load_videos(processor, root: Path, messages):
    """Each video decoded as transformers does (PyAV), its frames sampled by the Qwen3-VL
    video processor at its fps or the part's."""
    from functools import partial

    from transformers.video_utils import load_video

    vp = processor.video_processor
    videos, metadata = [], []
    for part in parts(messages, "video_url"):
        pick = partial(vp.sample_frames, fps=part.get("fps", vp.fps))
        video, meta = load_video(str(root / part["url"]), backend="pyav", sample_indices_fn=pick)
        videos.append(video)
        metadata.append(meta)
    return videos, metadata


def torch_levels(pixel_values: torch.Tensor) -> torch.Tensor:
    """torchvision's normalisation here is (u8 - 127.5) / 127.5 in f32: the u8 levels are a
    lossless, four times smaller record. Checked, so the test's decoding is exact."""
    levels = torch.round(pixel_values.double() * 127.5 + 127.5).to(torch.uint8)
    decoded = (levels.float() - 127.5) / 127.5
    assert torch.equal(decoded, pixel_values.float()), "pixel values are not (u8 - 127.5) / 127.5"
    return levels.contiguous()


def load_model(model_dir: Path):
    return Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def record(model_dir: Path, root: Path, cases: dict, out: Path, model=None, store_pixels=True) -> None:
    """`model`: one already loaded (a PEFT model with its adapter), else the folder's."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = model if model is not None else load_model(model_dir)
    eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    results, tensors = {}, {}
    for name, case in cases.items():
        prompt = processor.apply_chat_template(to_hf_messages(case["messages"]), add_generation_prompt=True)
        images = [Image.open(root / p["url"]) for p in parts(case["messages"], "image_url")]
        kwargs = {}
        if "max_pixels" in case:
            kwargs["images_kwargs"] = {"size": {"shortest_edge": processor.image_processor.size["shortest_edge"],
                                                "longest_edge": case["max_pixels"]}}
        videos, meta = load_videos(processor, root, case["messages"])
        if videos:
            kwargs.update(videos=videos, video_metadata=meta, do_sample_frames=False)
        inputs = processor(text=prompt, images=images or None, return_tensors="pt", **kwargs)
        result = model.generate(
            **inputs,
            max_new_tokens=GREEDY_TOKENS,
            min_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            output_logits=True,
            return_dict_in_generate=True,
        )
        generated = result.sequences[0, inputs["input_ids"].shape[1]:]
        entry = {
            "messages": case["messages"],
            "prompt": prompt,
            "input_ids": inputs["input_ids"][0].tolist(),
            "greedy_tokens": generated.tolist(),
        }
        tensors[f"{name}.logits"] = result.logits[0][0].float().contiguous()
        if images:
            entry["image_grid_thw"] = inputs["image_grid_thw"].tolist()
            if store_pixels:
                tensors[f"{name}.pixel_levels_torch"] = torch_levels(inputs["pixel_values"])
        if videos:
            entry["video_grid_thw"] = inputs["video_grid_thw"].tolist()
            entry["frame_indices"] = [[int(i) for i in m.frames_indices] for m in meta]
            if store_pixels:
                tensors[f"{name}.pixel_levels_torch"] = torch_levels(inputs["pixel_values_videos"])
        results[name] = entry
        print(f"  {name}: {len(entry['input_ids'])} prompt tokens, generated {generated.tolist()[:8]}...")
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "greedy_tokens": GREEDY_TOKENS}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cases": results}, indent=1))
    save_file(tensors, str(out.with_suffix(".safetensors")))


ADAPTER = "lang-r4"
ADAPTER_CASES = ["wide", "video", "multi_turn"]


def make_adapter(model_dir: Path, fixtures: Path) -> None:
    """A PEFT LoRA on every projection of the decoder, A and B both random
    (`init_lora_weights=False`: no training needed for its answers to differ), and what
    transformers+PEFT computes with it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED + 1)
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(load_model(model_dir), config).eval()
    dst = fixtures / "adapters" / model_dir.name / ADAPTER
    shutil.rmtree(dst, ignore_errors=True)
    model.save_pretrained(dst)
    (dst / "README.md").unlink(missing_ok=True)
    config = json.loads((dst / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = model_dir.name  # not this machine's path
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    out = fixtures / "reference" / f"{model_dir.name}-lora-{ADAPTER}"
    record(model_dir, fixtures, {c: CASES[c] for c in ADAPTER_CASES}, out, model=model, store_pixels=False)


def make_tiny(fixtures: Path) -> None:
    dst = fixtures / "models" / "tiny-qwen3vl"
    shutil.rmtree(dst, ignore_errors=True)
    build_tiny(dst)
    print(f"tiny-qwen3vl: recording transformers {transformers.__version__}")
    record(dst, fixtures, CASES, fixtures / "reference" / "tiny-qwen3vl")
    make_adapter(dst, fixtures)


def make_big(out: Path, fixtures: Path) -> None:
    """Same layout as tests/fixtures, so the parity test runs on either root."""
    dst = out / "models" / "qwen3vl-2b-random"
    shutil.rmtree(dst, ignore_errors=True)
    build_big(dst)
    for d in ["images", "videos"]:
        shutil.copytree(fixtures / d, out / d, dirs_exist_ok=True)
    (out / "reference").mkdir(exist_ok=True)
    print(f"qwen3vl-2b-random: recording transformers {transformers.__version__}")
    record(dst, out, CASES, out / "reference" / "qwen3vl-2b-random")
