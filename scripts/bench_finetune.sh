#!/usr/bin/env bash
# Fine-tuning memory and speed: LoRA (r 8, every text projection) at batch 4 on a model
# folder, five ways in one run — the f32 base, --gradient-checkpointing, --quantize q8_0
# (which checkpoints too, by default), q8_0 alone (--no-gradient-checkpointing), and a LoRA
# on the vision encoder and connector as well, checkpointed — each a fresh process of the
# release binary; prints each run's peak resident memory
# (the process's VmHWM, loading included) and tokens/s of its optimizer steps, with ratios
# against the f32 base measured here, and each process's wall time (loading, the frozen
# encoder's pass over the images, the steps).
#   [DETAIL=low|high] scripts/bench_finetune.sh MODEL_DIR [STEPS] [THREADS]
#   (MODEL_DIR: e.g. `python scripts/make_fixtures.py big OUT` → OUT/models/smolvlm-256m-random)
# DETAIL: the images' `detail` (low, the default: one 512-pixel view, 64 image tokens;
# high: SmolVLM-256M's processor enlarges each image to 2048 pixels and cuts 13 tiles, 832
# tokens). A run that fails (the kernel's OOM killer) is reported as such.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/bench_finetune.sh MODEL_DIR [STEPS] [THREADS]}
steps=${2:-3}
threads=${3:-2}
bin=target/release/ocellus
[ -x "$bin" ] || cargo build --release --bin ocellus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 16 conversations over four fixture images, each answered in about 40 words.
python3 - "$work" "${DETAIL:-low}" <<'PY'
import json, pathlib, shutil, sys
work, detail = pathlib.Path(sys.argv[1]), sys.argv[2]
images = ["embed-0.png", "embed-3.png", "wide.png", "gray.png"]
for name in images:
    shutil.copy(pathlib.Path("tests/fixtures/images") / name, work / name)
answer = ("The picture shows a wide field of colour with a few shapes near the middle, "
          "a lighter band along the top edge and a darker corner at the bottom right; "
          "nothing in it is moving and there is no text to read anywhere in the frame.")
with open(work / "train.jsonl", "w") as f:
    for i in range(16):
        user = {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": images[i % len(images)], "detail": detail}},
            {"type": "text", "text": f"Describe picture number {i} in one sentence."}]}
        f.write(json.dumps({"messages": [user, {"role": "assistant", "content": answer}]}) + "\n")
PY

run() {  # name, extra flags... -> "peak_mib tokens_per_s tokens wall_s"
  local name=$1; shift
  local began; began=$(date +%s.%N)
  RAYON_NUM_THREADS=$threads "$bin" finetune --model "$model" --data "$work/train.jsonl" \
    --out "$work/out-$name" --max-steps "$steps" --batch-size 4 --lora-dropout 0 \
    --logging-steps 1 "$@" > "$work/$name.log" 2>&1 || { echo "failed failed 0 0"; return; }
  local wall; wall=$(echo "$(date +%s.%N) - $began" | bc -l)
  python3 - "$work/$name.log" "$wall" <<'PY'
import re, sys
line = [l for l in open(sys.argv[1]) if "peak resident memory" in l][-1]
tokens, seconds, rate, peak = re.search(r"(\d+) tokens in ([\d.]+) s of steps \((\d+) tokens/s\); peak resident memory (\d+) MiB", line).groups()
print(peak, rate, tokens, f"{float(sys.argv[2]):.0f}")
PY
}

echo "$(lscpu | sed -n 's/^Model name: *//p'); $(grep -o -w 'avx2\|fma\|avx512f\|avx512_bf16\|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "model: $model; $steps steps of batch 4; $threads threads"
ratio() { [ "$1" = failed ] || [ "$2" = failed ] && echo "-" || printf "%.2f" "$(echo "$1 / $2" | bc -l)"; }
printf "%-26s %10s %8s %12s %8s %8s %8s\n" run "peak MiB" ratio "tokens/s" ratio tokens "wall s"
read -r base_peak base_rate base_tokens base_wall < <(run f32)
printf "%-26s %10s %8s %12s %8s %8s %8s\n" "f32 base" "$base_peak" 1.00 "$base_rate" 1.00 "$base_tokens" "$base_wall"
vision=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,vision.q_proj,vision.k_proj,vision.v_proj
vision=$vision,vision.out_proj,vision.fc1,vision.fc2,connector
for spec in "checkpointing:--gradient-checkpointing" "q8_0 (checkpointed):--quantize q8_0" \
  "q8_0 alone:--quantize q8_0 --no-gradient-checkpointing" \
  "vision LoRA, checkpointed:--gradient-checkpointing --lora-target-modules $vision"; do
  name=${spec%%:*}; flags=${spec#*:}
  # shellcheck disable=SC2086
  read -r peak rate tokens wall < <(run "${name//[^a-z0-9_]/-}" $flags)
  printf "%-26s %10s %8s %12s %8s %8s %8s\n" "$name" "$peak" "$(ratio "$peak" "$base_peak")" \
    "$rate" "$(ratio "$rate" "$base_rate")" "$tokens" "$wall"
done
