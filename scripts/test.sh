#!/usr/bin/env bash
# Runs every test. Installs what the tests need besides Rust on first use: FFmpeg's
# libraries and promtool (scripts/system-deps.sh) and a Python virtual environment with the
# official openai package and Selenium (target/test-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

# The layer table and the size limits (DESIGN.md), before anything is built.
python3 scripts/check_layers.py
scripts/system-deps.sh --test

venv=target/test-venv
if ! "$venv/bin/python" -c "import openai, selenium" >/dev/null 2>&1; then
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/test-requirements.txt
fi
export OCELLUS_TEST_PYTHON="$PWD/$venv/bin/python"
cargo test --all-targets "$@"
# The Dockerfile, Kubernetes manifests, compose file, Prometheus config and dashboard.
scripts/check-deploy.sh
# The serving load benchmark end to end, briefly, on the tiny fixture model.
cargo bench --profile dev --bench serving -- --concurrency 1,4 --max-tokens 8 >/dev/null
cargo bench --profile dev --bench video >/dev/null
