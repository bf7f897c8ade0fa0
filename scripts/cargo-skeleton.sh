#!/usr/bin/env bash
# Writes OUT: the manifests (Cargo.toml, Cargo.lock), build.rs and proto/ of this tree, and
# a stub for every other target `cargo metadata` lists (library, binaries, benches, tests,
# examples), so that OUT builds every dependency and nothing of ours. The Dockerfile builds
# it as its dependency layer, which then changes only when the manifests do (the trick
# cargo-chef plays, without installing it); a new target needs no edit here.
#   scripts/cargo-skeleton.sh OUT
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/cargo-skeleton.sh OUT}
root=$PWD
mkdir -p "$out"
cp Cargo.toml Cargo.lock build.rs "$out/"
cp -r proto "$out/"
# Every target's source path, one per line (JSON strings hold no raw newlines).
metadata=$(cargo metadata --no-deps --format-version 1 --offline)
count=0
while IFS= read -r path; do
  relative=${path#"$root"/}
  [ "$relative" != "$path" ] || { echo "a target outside the tree: $path" >&2; exit 1; }
  [ "$relative" = build.rs ] && continue
  mkdir -p "$out/$(dirname "$relative")"
  if [ "$relative" = src/lib.rs ]; then
    : > "$out/$relative"
  else
    echo 'fn main() {}' > "$out/$relative"
  fi
  count=$((count + 1))
done < <(grep -o '"src_path":"[^"]*"' <<<"$metadata" | cut -d'"' -f4)
[ "$count" -gt 0 ] || { echo "cargo metadata listed no targets" >&2; exit 1; }
