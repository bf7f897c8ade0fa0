#!/usr/bin/env python3
"""Writes the colours fine-tuning set and the DPO pairs as hub datasets, with `datasets`, for
tests/datasets.rs: `ocellus finetune` must read them (TRL's columns, images as encoded bytes)
to the same examples, and the same losses, as the JSONL they come from.

  python scripts/fixtures_datasets.py   # (also run by `make_fixtures.py tiny` and `datasets`)

Writes under tests/fixtures/finetune/hub/:
  colours-sft/data/{train,test}-00000-of-00001.parquet   `messages` with {"type": "image"}
      placeholders and `images` (a list of Image), from colours/train.jsonl and eval.jsonl
      (snappy and zstd);
  colours-dpo/data/train-00000-of-00001.parquet   `prompt`, `chosen`, `rejected` (message
      lists) and `images`, from dpo/pairs.jsonl;
  broken/data/train-00000-of-00001.parquet   four rows in row groups of two, the fourth
      (row group 1, row 1) holding two placeholders for one image.
"""

import json
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets import Dataset, Features, Image, List, Value

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = ROOT / "tests" / "fixtures" / "finetune"
HUB = FINETUNE / "hub"

TEXT_PART = {"type": Value("string"), "text": Value("string")}
MESSAGE = {"role": Value("string"), "content": List(TEXT_PART)}


def trl_messages(messages, folder: Path):
    """OpenAI-format messages → TRL's (image placeholders, text parts) and the images' bytes."""
    images, out = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content:
            if part["type"] == "image_url":
                images.append({"bytes": (folder / part["image_url"]["url"]).read_bytes(), "path": None})
                parts.append({"type": "image", "text": None})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": message["role"], "content": parts})
    return out, images


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(rows: list, features: Features, path: Path, row_group: int | None = None, zstd=False) -> None:
    """As `push_to_hub` writes a shard: `to_parquet` (images plain, other columns snappy),
    each batch a row group; or rewritten by pyarrow with zstd, as some hub datasets are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=features).to_parquet(str(path), batch_size=row_group)
    if zstd:
        pq.write_table(pq.read_table(path), path, compression="zstd")
    groups = pq.ParquetFile(path).metadata.num_row_groups
    if row_group:
        assert groups == -(-len(rows) // row_group), f"{path}: {groups} row groups"


def sft(split_file: Path):
    rows = []
    for line in read_jsonl(split_file):
        messages, images = trl_messages(line["messages"], split_file.parent)
        rows.append({"messages": messages, "images": images})
    return rows


def main() -> None:
    shutil.rmtree(HUB, ignore_errors=True)
    features = Features({"messages": List(MESSAGE), "images": List(Image())})
    colours = FINETUNE / "colours"
    # pyarrow's default codec, and zstd (some hub datasets use it) for the held-out split.
    for split, source, zstd in [("train", "train.jsonl", False), ("test", "eval.jsonl", True)]:
        path = HUB / "colours-sft" / "data" / f"{split}-00000-of-00001.parquet"
        write(sft(colours / source), features, path, zstd=zstd)

    pairs = []
    for line in read_jsonl(FINETUNE / "dpo" / "pairs.jsonl"):
        prompt, images = trl_messages(line["prompt"], FINETUNE / "dpo")
        side = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
        pairs.append({"prompt": prompt, "chosen": side(line["chosen"]), "rejected": side(line["rejected"]), "images": images})
    features = Features(
        {"prompt": List(MESSAGE), "chosen": List(MESSAGE), "rejected": List(MESSAGE), "images": List(Image())}
    )
    write(pairs, features, HUB / "colours-dpo" / "data" / "train-00000-of-00001.parquet")

    broken = sft(colours / "train.jsonl")[:4]
    broken[3]["messages"][0]["content"].insert(0, {"type": "image", "text": None})
    features = Features({"messages": List(MESSAGE), "images": List(Image())})
    write(broken, features, HUB / "broken" / "data" / "train-00000-of-00001.parquet", row_group=2)
    print(f"hub datasets written under {HUB} (datasets {datasets.__version__})")


if __name__ == "__main__":
    main()
