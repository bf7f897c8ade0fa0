#!/usr/bin/env bash
# Video preprocessing, Ocellus (benches/video.rs) and transformers side by side, same video,
# same SmolVLM2 preprocessor config, same machine, one run.
#   PYTHON=/path/to/venv/bin/python scripts/bench_video.sh [VIDEO] [RUNS]
# Without VIDEO, a 60 s 1280x720 30 fps H.264 video is generated first (needs the venv of
# scripts/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
video="${1:-}"
runs="${2:-3}"
if [ -z "$video" ]; then
  video="$(mktemp -d)/bench720.mp4"
  "$python" scripts/make_fixtures.py video "$video"
fi
echo "== ocellus"
ours=$(cargo bench --bench video -- "$video" "$runs" 2>/dev/null | tee /dev/stderr | awk '/^total/ {print $2}')
echo "== transformers"
theirs=$("$python" scripts/bench_video_transformers.py "$video" "$runs" 2>/dev/null | tee /dev/stderr | awk '/^total/ {print $2}')
echo "ocellus / transformers time: $(awk -v a="$ours" -v b="$theirs" 'BEGIN {printf "%.2f", a / b}')"
