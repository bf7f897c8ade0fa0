#!/usr/bin/env bash
# Runs benches/model.rs (Ocellus) and scripts/bench_transformers.py on the same model, one
# after the other on this machine, with the same thread count, and prints both with ratios.
#   scripts/bench_model.sh MODEL_DIR [THREADS]
#   (MODEL_DIR: e.g. the folder `python scripts/make_fixtures.py big OUT` wrote, OUT/models/smolvlm-256m-random)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/bench_model.sh MODEL_DIR [THREADS]}
threads=${2:-2}
python=${PYTHON:-.venv/bin/python}

RAYON_NUM_THREADS=$threads OCELLUS_BENCH_MODEL=$model cargo bench --bench model -- --noplot
$python scripts/bench_transformers.py "$model" --threads "$threads" > target/transformers-bench.json
$python - "$threads" <<'PY'
import json, pathlib, sys
root = pathlib.Path("target/criterion")
def ours(group, bench):
    [path] = list((root / group).glob(f"{bench}*/**/new/estimates.json"))
    return json.loads(path.read_text())["median"]["point_estimate"] / 1e9
t = json.loads(pathlib.Path("target/transformers-bench.json").read_text())
tiles = t["tiles"]
rows = [
    ("vision encode, s per tile", ours("vision", "encode_tiles") / tiles, t["vision_per_tile_s"], False),
    ("prefill, tokens/s", t["prompt_tokens"] / ours("prefill", "photo_prompt_tokens"), t["prefill_tokens_per_s"], True),
    ("decode batch 1, tokens/s", 1 / ours("decode_step", "batch/1"), t["decode_tokens_per_s_batch1"], True),
    ("decode batch 8, tokens/s", 8 / ours("decode_step", "batch/8"), t["decode_tokens_per_s_batch8"], True),
]
print(f"\n{sys.argv[1]} threads, {tiles} tiles per encode, {t['prompt_tokens']}-token photo prompt, 512-token decode context")
print(f"{'':28} {'ocellus':>10} {'transformers':>13} {'ocellus advantage':>18}")
for name, o, r, higher_better in rows:
    adv = o / r if higher_better else r / o
    print(f"{name:28} {o:10.3f} {r:13.3f} {adv:17.2f}x")
PY
