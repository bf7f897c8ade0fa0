#!/usr/bin/env bash
# Contrastive throughput, Ocellus against transformers on the same model, inputs and
# threads, in alternating turns (this machine's speed drifts within minutes):
#   scripts/bench_embeddings.sh MODEL_DIR [ROUNDS]
# MODEL_DIR: from `python scripts/make_fixtures.py embeddings-big OUT` (OUT/clip-vit-base-patch32).
# Needs the Python environment of scripts/requirements.txt as $PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1
rounds=${2:-3}
python=${PYTHON:-python3}
threads=${THREADS:-2}
cargo bench --bench embeddings --no-run >/dev/null 2>&1
for round in $(seq "$rounds"); do
  RAYON_NUM_THREADS=$threads OCELLUS_BENCH_MODEL=$model cargo bench --bench embeddings 2>/dev/null | grep '^{'
  (cd scripts && "$python" bench_embeddings_transformers.py "$model" --threads "$threads")
done
