#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/) with libFuzzer's coverage instrumentation on stable Rust
# (the -C flags cargo-fuzz passes, without a sanitizer: the code is safe Rust, and what is
# hunted is a panic, an overflow, a hang or a runaway allocation) and runs each for a while.
#   scripts/fuzz.sh TARGET [SECONDS]   # one target (request, image, video, template, sse)
#   scripts/fuzz.sh all [SECONDS]      # each in turn (default 600 s each)
#   scripts/fuzz.sh merge              # fold what the runs found into fuzz/corpus
# The committed corpus (fuzz/corpus/TARGET) seeds each run; what a run finds goes to
# fuzz/target/corpus/TARGET, and `scripts/fuzz.sh merge` folds it into the committed corpus,
# keeping only inputs that add coverage (libFuzzer's -merge=1). A crash is written to
# fuzz/artifacts/TARGET/ and replays with
#   fuzz/target/x86_64-unknown-linux-gnu/release/TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/fuzz.sh TARGET|all [SECONDS]}
seconds=${2:-600}
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cforce-frame-pointers"
# An explicit --target keeps the flags off build scripts and proc macros, which run on the
# host without libFuzzer's hooks.
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --manifest-path fuzz/Cargo.toml --target-dir fuzz/target --target "$host"
bin=fuzz/target/$host/release
targets=("$target")
[ "$target" = all ] || [ "$target" = merge ] && targets=(request image video template sse)
for t in "${targets[@]}"; do
  if [ "$target" = merge ]; then
    mkdir -p "fuzz/target/merged/$t"
    "$bin/$t" -merge=1 -rss_limit_mb=2048 "fuzz/target/merged/$t" "fuzz/corpus/$t" "fuzz/target/corpus/$t"
    rm -rf "fuzz/corpus/$t" && mv "fuzz/target/merged/$t" "fuzz/corpus/$t"
    continue
  fi
  mkdir -p "fuzz/target/corpus/$t" "fuzz/artifacts/$t"
  # 2 GB of memory and 10 s per input at most: past either, libFuzzer reports the input.
  "$bin/$t" "fuzz/target/corpus/$t" "fuzz/corpus/$t" -artifact_prefix="fuzz/artifacts/$t/" \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=262144 -print_final_stats=1
done
