"""Contrastive fixtures for make_fixtures.py: tiny random-weight CLIPModel and SiglipModel in
the real Hugging Face layout (configs, tokenizers and image processors derived from the real
files in ../shared/reference), and what transformers computes on them: token ids, pixel
values, image and text embeddings (each alone and all in one batch) and the logits between
them. Outside the repository, the same for the real CLIP ViT-B/32 and SigLIP base configs
(the ignored parity tests and the benchmarks).

SigLIP's SentencePiece model is not available here (../shared/reference/siglip-base-patch16-224/
SOURCES.md): its text goes through the `tokenizers` file that stands in for it, after the
canonicalisation `SiglipTokenizer` applies (lower case, no punctuation, single spaces),
padded to 64 tokens as the model expects; that is what Ocellus does too.

Images go through transformers' default image backend (torchvision, uint8 resize)."""

import copy
import json
import re
import shutil
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import Tokenizer

from tokenizers import models, normalizers, pre_tokenizers, processors, decoders
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO.parent / "shared" / "reference"
CLIP_REF = REFERENCE / "clip-vit-base-patch32"
SIGLIP_REF = REFERENCE / "siglip-base-patch16-224"
SIGLIP_TOKENIZER = SIGLIP_REF / "nonhub" / "xenova-derived.tokenizer.json"
SEED = 2023
TINY_VOCAB = 1024

TEXTS = [
    "a photo of a cat",
    "Two RED squares, on the left!",
    "the digit 7",
    "A blue triangle   next to\ta green circle; it's small.",
    "x",
]


def images() -> list[Image.Image]:
    """Photos of every shape the processors must handle: landscape, portrait, odd sizes
    (center-crop rounding), smaller than the crop (upscaled), grayscale and RGBA."""
    rng = np.random.default_rng(SEED)
    out = []
    for w, h, mode in [(320, 240, "RGB"), (97, 203, "RGB"), (50, 50, "L"), (301, 129, "RGBA")]:
        arr = rng.integers(0, 256, size=(h, w, len(mode)), dtype=np.uint8)
        img = Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode)
        draw = ImageDraw.Draw(img)
        draw.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(200,) * len(mode) if mode != "L" else 200)
        out.append(img)
    return out


def save_images(dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images()):
        name = f"embed-{i}.png"
        img.save(dst / name)
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------


def clip_small_tokenizer(vocab_size: int) -> dict:
    """CLIP's byte-level BPE cut to its first `vocab_size - 2` entries (the 512 byte symbols
    with and without `</w>`, then merges by rank) and the merges inside them; the two special
    tokens renumbered to the last two ids (end of text stays the highest, which is where the
    legacy pooling looks)."""
    real = json.loads((CLIP_REF / "tokenizer.json").read_text())
    keep = vocab_size - 2
    vocab = {tok: i for tok, i in real["model"]["vocab"].items() if i < keep}
    merges = []
    for merge in real["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        if left in vocab and right in vocab and left + right in vocab:
            merges.append([left, right])
    tok = copy.deepcopy(real)
    ids = {"<|startoftext|>": keep, "<|endoftext|>": keep + 1}
    for entry in tok["added_tokens"]:
        entry["id"] = ids[entry["content"]]
        vocab[entry["content"]] = entry["id"]
    tok["model"]["vocab"] = vocab
    tok["model"]["merges"] = merges
    tok["post_processor"]["sep"] = ["<|endoftext|>", keep + 1]
    tok["post_processor"]["cls"] = ["<|startoftext|>", keep]
    return tok


def siglip_small_tokenizer(vocab_size: int) -> dict:
    """The stand-in SigLIP Unigram cut to its first `vocab_size` pieces, with NFKC in place of
    the 300 kB precompiled charsmap (a fixture's tokenizer; the real one is tested from
    ../shared/reference)."""
    real = json.loads(SIGLIP_TOKENIZER.read_text())
    tok = copy.deepcopy(real)
    tok["model"]["vocab"] = real["model"]["vocab"][:vocab_size]
    tok["normalizer"] = {
        "type": "Sequence",
        "normalizers": [{"type": "NFKC"}, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}],
    }
    return tok


def siglip_canonicalize(text: str) -> str:
    """`SiglipTokenizer`'s text canonicalisation (do_lower_case, then canonicalize_text)."""
    text = text.lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\s+", " ", text)
    return text.strip()


def siglip_ids(tokenizer: Tokenizer, texts: list[str], max_length: int, pad: int) -> list[list[int]]:
    out = []
    for text in texts:
        ids = tokenizer.encode(siglip_canonicalize(text)).ids[:max_length]
        out.append(ids + [pad] * (max_length - len(ids)))
    return out


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def tiny_clip_config() -> CLIPConfig:
    real = json.loads((CLIP_REF / "config.json").read_text())
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    text = dict(real["text_config"], **small, vocab_size=TINY_VOCAB)
    vision = dict(real["vision_config"], **small, image_size=64, patch_size=16)
    # The real config names the legacy end of text (2), pooled by argmax; keep it.
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=2.6592)


def tiny_siglip_config() -> SiglipConfig:
    real = json.loads((SIGLIP_REF / "config.json").read_text())
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(real["text_config"], **small, vocab_size=TINY_VOCAB)
    vision = dict(real["vision_config"], **small, image_size=64, patch_size=16)
    return SiglipConfig(text_config=text, vision_config=vision)


def randomize(model: torch.nn.Module, seed: int, gain: float = 1.0) -> None:
    """Weights of a random, untrained model whose activations keep their scale through the
    layers, as a trained model's do: matrices with std gain/sqrt(fan-in), embeddings and biases
    0.2, norms near 1; logit scale and bias at values trained models have."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "logit_scale":
                param.fill_(float(np.log(100.0)) if param.dim() == 0 else 2.3)
            elif name == "logit_bias":
                param.fill_(-10.0)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif param.dim() >= 2 and "embedding.weight" not in name and "probe" not in name:
                fan_in = param[0].numel()
                param.copy_(gain * torch.randn(param.shape, generator=gen) / np.sqrt(fan_in))
            else:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def features(t) -> torch.Tensor:
    """`get_*_features`' projected embeddings (a tensor, or an output holding them)."""
    return t.pooler_output if hasattr(t, "pooler_output") else t


def unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(p=2, dim=-1, keepdim=True)


def embeddings(model, pixel_values, ids, attention_mask) -> dict:
    """Normalised image and text embeddings, alone and batched, and the logits."""
    with torch.no_grad():
        image_batched = features(model.get_image_features(pixel_values=pixel_values))
        text_batched = features(model.get_text_features(input_ids=ids, attention_mask=attention_mask))
        image_alone = torch.cat([features(model.get_image_features(pixel_values=p[None])) for p in pixel_values])
        text_alone = []
        for row, mask in zip(ids, attention_mask if attention_mask is not None else [None] * len(ids)):
            n = int(mask.sum()) if mask is not None else len(row)
            text_alone.append(features(model.get_text_features(input_ids=row[None, :n])))
        text_alone = torch.cat(text_alone)
        out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=attention_mask)

    return {
        "image_embeds": unit(image_batched).tolist(),
        "image_embeds_alone": unit(image_alone).tolist(),
        "text_embeds": unit(text_batched).tolist(),
        "text_embeds_alone": unit(text_alone).tolist(),
        "logits_per_image": out.logits_per_image.tolist(),
    }


def make_clip(dst: Path, config: CLIPConfig | None, tokenizer: dict | None, image_dir: Path, names: list[str]) -> tuple:
    """A random CLIPModel at `dst` (the real tokenizer and processor, or the tiny ones) and
    transformers' outputs on the fixture texts and images."""
    torch.manual_seed(SEED)
    dst.mkdir(parents=True, exist_ok=True)
    model = CLIPModel(config).eval()
    randomize(model, SEED)
    model.save_pretrained(dst, safe_serialization=True)
    if tokenizer is None:
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]:
            shutil.copyfile(CLIP_REF / name, dst / name)
    else:
        (dst / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
        tok_config = json.loads((CLIP_REF / "tokenizer_config.json").read_text())
        (dst / "tokenizer_config.json").write_text(json.dumps(tok_config))
    processor_config = json.loads((CLIP_REF / "preprocessor_config.json").read_text())
    size = config.vision_config.image_size
    processor_config.update(size=size, crop_size=size)
    (dst / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")

    tok = CLIPTokenizer.from_pretrained(dst)
    encoded = tok(TEXTS, padding=True, return_tensors="pt")
    processor = CLIPImageProcessor.from_pretrained(dst)
    pil = [Image.open(image_dir / n) for n in names]
    pixel_values = processor(images=pil, return_tensors="pt")["pixel_values"]
    ref = {
        "texts": TEXTS,
        "images": names,
        "input_ids": [row[: int(m.sum())].tolist() for row, m in zip(encoded["input_ids"], encoded["attention_mask"])],
        "pixel_values_file": "pixel_values.safetensors",
        "logit_scale": float(model.logit_scale.exp()),
    }
    ref.update(embeddings(model, pixel_values, encoded["input_ids"], encoded["attention_mask"]))
    return ref, pixel_values


def make_siglip(dst: Path, config: SiglipConfig, tokenizer: dict | None, image_dir: Path, names: list[str]) -> tuple:
    torch.manual_seed(SEED + 1)
    dst.mkdir(parents=True, exist_ok=True)
    model = SiglipModel(config).eval()
    randomize(model, SEED + 1)
    model.save_pretrained(dst, safe_serialization=True)
    for name in ["tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copyfile(SIGLIP_REF / name, dst / name)
    if tokenizer is None:
        shutil.copyfile(SIGLIP_TOKENIZER, dst / "tokenizer.json")
    else:
        (dst / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    processor_config = json.loads((SIGLIP_REF / "preprocessor_config.json").read_text())
    size = config.vision_config.image_size
    processor_config["size"] = {"height": size, "width": size}
    (dst / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")

    max_length = config.text_config.max_position_embeddings
    ids = siglip_ids(Tokenizer.from_file(str(dst / "tokenizer.json")), TEXTS, max_length, pad=1)
    processor = SiglipImageProcessor.from_pretrained(dst)
    pil = [Image.open(image_dir / n) for n in names]
    pixel_values = processor(images=pil, return_tensors="pt")["pixel_values"]
    ref = {
        "texts": TEXTS,
        "images": names,
        "input_ids": ids,
        "pixel_values_file": "pixel_values.safetensors",
        "logit_scale": float(model.logit_scale.exp()),
        "logit_bias": float(model.logit_bias),
    }
    ref.update(embeddings(model, pixel_values, torch.tensor(ids), None))
    return ref, pixel_values


def write_reference(path: Path, ref: dict, pixel_values: torch.Tensor) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "reference.json").write_text(json.dumps(ref))
    save_file({"pixel_values": pixel_values.contiguous()}, str(path / ref["pixel_values_file"]))


def bert_tokenizer(words: list[str]) -> Tokenizer:
    """A small uncased WordPiece tokenizer in BERT's pipeline (BLIP's text encoder is BERT):
    the special tokens at BERT's ids, single characters, their `##` continuations and whole
    words."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(string.punctuation)
    vocab += chars + ["##" + c for c in chars if c.isalnum()]
    vocab += sorted({w for w in words if w not in vocab})
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 101), ("[SEP]", 102)],
    )
    tok.decoder = decoders.WordPiece()
    return tok


def tiny_blip_config(vocab_size: int) -> BlipConfig:
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(small, vocab_size=vocab_size, max_position_embeddings=64, encoder_hidden_size=32)
    vision = dict(small, image_size=64, patch_size=16)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def make_blip(dst: Path, image_dir: Path, names: list[str]) -> tuple:
    """A tiny random BlipForImageTextRetrieval and its ITC embeddings and ITM probabilities
    of every image with every text."""
    dst.mkdir(parents=True, exist_ok=True)
    words = sorted({w for t in TEXTS for w in re.findall(r"[a-z]+", t.lower())})
    tokenizer = bert_tokenizer(words)
    tokenizer.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]",
    }, indent=2) + "\n")
    torch.manual_seed(SEED + 2)
    model = BlipForImageTextRetrieval(tiny_blip_config(tokenizer.get_vocab_size())).eval()
    # BERT's post-norm layers average a random model's tokens into near-equal first
    # positions; larger weights keep the texts' scores apart.
    randomize(model, SEED + 2, gain=3.0)
    model.save_pretrained(dst, safe_serialization=True)
    processor = BlipImageProcessor(size={"height": 64, "width": 64})
    processor.save_pretrained(dst)

    tok = BertTokenizer.from_pretrained(dst)
    encoded = tok(TEXTS, padding=True, return_tensors="pt")
    pil = [Image.open(image_dir / n) for n in names]
    pixel_values = BlipImageProcessor.from_pretrained(dst)(images=pil, return_tensors="pt")["pixel_values"]
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    with torch.no_grad():
        itc = model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, use_itm_head=False)
        vision = model.vision_model(pixel_values=pixel_values).last_hidden_state
        image_embeds = unit(model.vision_proj(vision[:, 0, :]))
        text_states = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        text_embeds = unit(model.text_proj(text_states[:, 0, :]))
        itm = []
        for i in range(len(names)):
            pixels = pixel_values[i : i + 1].expand(len(TEXTS), -1, -1, -1)
            logits = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score
            itm.append(torch.softmax(logits, dim=-1)[:, 1].tolist())
    ref = {
        "texts": TEXTS,
        "images": names,
        "input_ids": [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)],
        "pixel_values_file": "pixel_values.safetensors",
        "logit_scale": 1.0,
        "image_embeds": image_embeds.tolist(),
        "image_embeds_alone": image_embeds.tolist(),
        "text_embeds": text_embeds.tolist(),
        "text_embeds_alone": text_embeds.tolist(),
        "logits_per_image": itc.itm_score.tolist(),
        "itm_probs": itm,
    }
    return ref, pixel_values


def make_tiny(fixtures: Path) -> None:
    names = save_images(fixtures / "images")
    clip_ref, clip_pixels = make_clip(
        fixtures / "models" / "tiny-clip",
        tiny_clip_config(),
        clip_small_tokenizer(TINY_VOCAB),
        fixtures / "images",
        names,
    )
    write_reference(fixtures / "reference" / "tiny-clip", clip_ref, clip_pixels)
    siglip_ref, siglip_pixels = make_siglip(
        fixtures / "models" / "tiny-siglip",
        tiny_siglip_config(),
        siglip_small_tokenizer(TINY_VOCAB),
        fixtures / "images",
        names,
    )
    write_reference(fixtures / "reference" / "tiny-siglip", siglip_ref, siglip_pixels)
    blip_ref, blip_pixels = make_blip(fixtures / "models" / "tiny-blip-itm", fixtures / "images", names)
    write_reference(fixtures / "reference" / "tiny-blip-itm", blip_ref, blip_pixels)


def make_demo_clip_base(out: Path) -> None:
    """The untrained demo CLIP: a small ViT for 64-pixel images (patches of 8) and a small
    causal text transformer over CLIP's tokenizer cut to 1024 entries, transformers' own
    initialisation; `ocellus finetune --method contrastive` trains it into
    models/ocellus-demo-clip."""
    real = json.loads((CLIP_REF / "config.json").read_text())
    text = dict(real["text_config"], hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                num_attention_heads=4, vocab_size=1024, max_position_embeddings=32)
    vision = dict(real["vision_config"], hidden_size=96, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, image_size=64, patch_size=8)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=64, logit_scale_init_value=2.6592)
    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    CLIPModel(config).eval().save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_text(json.dumps(clip_small_tokenizer(1024), ensure_ascii=False))
    tok_config = json.loads((CLIP_REF / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = 32
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    processor_config = json.loads((CLIP_REF / "preprocessor_config.json").read_text())
    processor_config.update(size=64, crop_size=64)
    (out / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")


def make_big(out: Path, fixtures: Path) -> None:
    """The real configs with random weights, outside the repository: `OUT/clip-vit-base-patch32`
    and `OUT/siglip-base-patch16-224`, each with `reference/` beside its files."""
    names = save_images(fixtures / "images")
    clip_config = CLIPConfig.from_pretrained(CLIP_REF)
    ref, pixels = make_clip(out / "clip-vit-base-patch32", clip_config, None, fixtures / "images", names)
    write_reference(out / "clip-vit-base-patch32-reference", ref, pixels)
    siglip_config = SiglipConfig.from_pretrained(SIGLIP_REF)
    ref, pixels = make_siglip(out / "siglip-base-patch16-224", siglip_config, None, fixtures / "images", names)
    write_reference(out / "siglip-base-patch16-224-reference", ref, pixels)
