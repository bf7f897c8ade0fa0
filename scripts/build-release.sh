#!/usr/bin/env bash
# The release build, as the Dockerfile runs it (and .ci/run, so that those commands are
# exercised where no Docker engine runs): system libraries, then the binary, with the
# committed Cargo.lock. Extra arguments go to cargo (`--features cuda`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/system-deps.sh
cargo build --release --locked --bin ocellus "$@"
