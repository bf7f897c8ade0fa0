#!/usr/bin/env bash
# The peer benchmark: on one machine, one after the other, with the same thread count and
# the same model: benches/model.rs and benches/decode_forms.rs (Ocellus, f32 and
# --quantize q8_0), transformers
# (scripts/bench_transformers.py, which also measures the machine's f32 GEMM roofline with
# torch), mistral.rs (scripts/bench_mistralrs.py, PyPI `mistralrs`) and llama.cpp
# (scripts/bench_llamacpp.py); prints ratios.
#   scripts/bench_model.sh MODEL_DIR [THREADS]
#   (MODEL_DIR: e.g. the folder `python scripts/make_fixtures.py big OUT` wrote, OUT/models/smolvlm-256m-random)
# PYTHON: a venv with scripts/requirements.txt and `mistralrs` (without it, mistral.rs is skipped).
# LLAMA_CPP: a llama.cpp source tree with llama-bench and llama-mtmd-cli built (without it,
# llama.cpp is skipped); see scripts/bench_llamacpp.py and the README.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/bench_model.sh MODEL_DIR [THREADS]}
threads=${2:-2}
python=${PYTHON:-.venv/bin/python}
mkdir -p target/peers

criterion_median() {  # group bench -> seconds
  python3 - "$1" "$2" <<'PY'
import json, pathlib, sys
group, name = pathlib.Path("target/criterion", sys.argv[1]), sys.argv[2]
# The benchmark `name`, or `name/PARAMETER` (batch/1 is not batch/16).
[path] = [p for p in group.glob("**/new/estimates.json")
          if (id := p.parent.parent.relative_to(group).as_posix()) == name or id.startswith(name + "/")]
print(json.loads(path.read_text())["median"]["point_estimate"] / 1e9)
PY
}

RAYON_NUM_THREADS=$threads OCELLUS_BENCH_MODEL=$model cargo bench --bench model -- --noplot '^(gemm|vision|prefill)'
echo "{\"gemm_s\": $(criterion_median gemm f32), \"vision_s\": $(criterion_median vision encode_tiles), \"prefill_s\": $(criterion_median prefill photo_prompt_tokens)}" \
  > target/peers/ocellus-criterion.json
# Decode in the storage forms, taking turns a few steps at a time (benches/decode_forms.rs):
# f32, the default (f32 layers whose weights are all bf16 values, as a bf16 checkpoint's are,
# kept in 16 bits: the same products); f32 held (every weight in f32); q8_0 (with its default
# f16 KV cache); and, for the note, q8_0 with an f32 cache and f32 with an f16 one.
RAYON_NUM_THREADS=$threads OCELLUS_BENCH_MODEL=$model cargo bench --bench decode_forms > target/peers/decode-forms.json
python3 - <<'PY'
import json, pathlib
peers = pathlib.Path("target/peers")
forms = json.loads((peers / "decode-forms.json").read_text())
for form, name in [("f32", "ocellus"), ("f32_held", "ocellus-f32-held"), ("q8_0", "ocellus-q8_0"),
                   ("q8_0_kv_f32", "ocellus-q8_0-kv-f32"), ("f32_kv_f16", "ocellus-kv-f16")]:
    out = {f"decode{b}_s": forms[f"batch{b}"][form] for b in (1, 8, 16)}
    if form == "f32":
        out |= json.loads((peers / "ocellus-criterion.json").read_text())
    (peers / f"{name}.json").write_text(json.dumps(out))
PY
# Serving: time to first token of the photo (cold, then the same request again: vision
# cache and prefix cache), and output tokens/s at concurrency 16 (detail low, 64 tokens).
RAYON_NUM_THREADS=$threads cargo bench --bench serving -- --model "$model" --prompt image \
  --concurrency 1 --requests 2 --max-tokens 1 > target/peers/ocellus-ttft.json
RAYON_NUM_THREADS=$threads cargo bench --bench serving -- --model "$model" --prompt image --detail low \
  --concurrency 16 --max-tokens 64 > target/peers/ocellus-c16.json
$python scripts/bench_transformers.py "$model" --threads "$threads" > target/peers/transformers.json
if $python -c "import mistralrs" 2>/dev/null; then
  # mistral.rs logs to stdout; the JSON is the last line.
  RAYON_NUM_THREADS=$threads $python scripts/bench_mistralrs.py "$model" 2>/dev/null | tail -n 1 > target/peers/mistralrs.json
else
  echo '{}' > target/peers/mistralrs.json
fi
if [ -n "${LLAMA_CPP:-}" ]; then
  $python scripts/bench_llamacpp.py "$model" --llama-cpp "$LLAMA_CPP" --threads "$threads" > target/peers/llamacpp.json
else
  echo '{}' > target/peers/llamacpp.json
fi

python3 - "$threads" <<'PY'
import json, pathlib, sys
load = lambda name: json.loads(pathlib.Path(f"target/peers/{name}.json").read_text())
o, q, t, m = load("ocellus"), load("ocellus-q8_0"), load("transformers"), load("mistralrs")
lc = load("llamacpp")
h = load("ocellus-f32-held")
# The serving bench lists TTFTs in ascending order: the cold request is the slowest.
ttft = sorted(load("ocellus-ttft")["levels"][0]["ttft_each_s"], reverse=True)
c16 = load("ocellus-c16")["levels"][0]
tiles = t["tiles"]
vision_s = o["vision_s"] / tiles
tile_gflop, prefill_gflop = t["vision_gflop_per_tile"], t["prefill_gflop"]
candle_gflops = 2 * 2048**3 / o["gemm_s"] / 1e9
roof = max(t["gemm_gflops"], candle_gflops)
print(f"\n{sys.argv[1]} threads; machine f32 GEMM at 2048^3: torch {t['gemm_gflops']:.0f} GFLOP/s,"
      f" candle (gemm crate) {candle_gflops:.0f} GFLOP/s; the roofline is the higher, {roof:.0f}")
# The FLOPs of every matrix product, attention's included (scripts/bench_transformers.py).
for name, gflop, ours_s, theirs_s in [("vision", tile_gflop, vision_s, t["vision_per_tile_s"]),
                                      ("prefill", prefill_gflop, o["prefill_s"], t["prefill_s"])]:
    print(f"{name}: {gflop:.0f} GFLOP{' per tile' if name == 'vision' else ''}: ocellus {gflop / ours_s:.0f} GFLOP/s"
          f" = {100 * gflop / ours_s / roof:.0f}% of the roofline; transformers {gflop / theirs_s:.0f} GFLOP/s"
          f" = {100 * gflop / theirs_s / roof:.0f}%")
rows = [  # name, Ocellus, transformers, mistral.rs, llama.cpp, higher is better
    ("vision encode, s per tile", vision_s, t["vision_per_tile_s"], None, lc.get("vision_per_tile_s"), False),
    ("prefill, tokens/s", t["prompt_tokens"] / o["prefill_s"], t["prefill_tokens_per_s"], None, lc.get("prefill_tokens_per_s"), True),
    ("decode batch 1, tokens/s", 1 / o["decode1_s"], t["decode_tokens_per_s_batch1"], m.get("decode_tokens_per_s_batch1"), lc.get("decode_tokens_per_s_batch1"), True),
    ("decode batch 1 f32 held, tokens/s", 1 / h["decode1_s"], t["decode_tokens_per_s_batch1"], m.get("decode_tokens_per_s_batch1"), lc.get("decode_tokens_per_s_batch1"), True),
    ("decode batch 1 q8_0, tokens/s", 1 / q["decode1_s"], t["decode_tokens_per_s_batch1"], m.get("decode_tokens_per_s_batch1"), lc.get("decode_q8_0_tokens_per_s_batch1"), True),
    ("decode batch 8, tokens/s", 8 / o["decode8_s"], t["decode_tokens_per_s_batch8"], None, None, True),
    ("decode batch 8 f32 held, tokens/s", 8 / h["decode8_s"], t["decode_tokens_per_s_batch8"], None, None, True),
    ("decode batch 8 q8_0, tokens/s", 8 / q["decode8_s"], t["decode_tokens_per_s_batch8"], None, None, True),
    ("TTFT photo, concurrency 1, s", ttft[0], t["ttft_photo_s"], m.get("ttft_photo_s"), lc.get("ttft_photo_s"), False),
    ("concurrency 16 vs batch 8, tok/s", c16["output_tokens_per_s"], t["decode_tokens_per_s_batch8"], None, None, True),
]
print(f"{'':32} {'ocellus':>9} {'transformers':>13} {'mistral.rs':>11} {'llama.cpp':>10} {'vs transformers':>16} {'vs mistral.rs':>14} {'vs llama.cpp':>13}")
for name, ours, tr, mr, ll, higher in rows:
    ratio = lambda theirs: (ours / theirs if higher else theirs / ours) if theirs else None
    fmt = lambda x: f"{x:.3f}" if x is not None else "-"
    rt, rm, rl = ratio(tr), ratio(mr), ratio(ll)
    print(f"{name:32} {ours:9.3f} {tr:13.3f} {fmt(mr):>11} {fmt(ll):>10} {fmt(rt) + 'x':>16}"
          f" {(fmt(rm) + 'x') if rm else '-':>14} {(fmt(rl) + 'x') if rl else '-':>13}")
print("(llama.cpp: llama-bench on f32 and q8_0 GGUFs of the text model, the q8_0 row against its q8_0;"
      " its TTFT is llama-mtmd-cli's, the projector's load included)")
print(f"decode batch 16 (Ocellus only), tokens/s: f32 {16 / o['decode16_s']:.1f}, f32 held {16 / h['decode16_s']:.1f}, q8_0 {16 / q['decode16_s']:.1f}")
print(f"q8_0 vs f32 decode: batch 1 {o['decode1_s'] / q['decode1_s']:.2f}x, batch 8 {o['decode8_s'] / q['decode8_s']:.2f}x;"
      f" vs f32 held in f32: batch 1 {h['decode1_s'] / q['decode1_s']:.2f}x, batch 8 {h['decode8_s'] / q['decode8_s']:.2f}x")
qf, fh = load("ocellus-q8_0-kv-f32"), load("ocellus-kv-f16")
print(f"KV cache dtype: q8_0 with an f32 cache vs f32 decode: batch 1 {o['decode1_s'] / qf['decode1_s']:.2f}x,"
      f" batch 8 {o['decode8_s'] / qf['decode8_s']:.2f}x; f32 with an f16 cache: batch 1 {o['decode1_s'] / fh['decode1_s']:.2f}x,"
      f" batch 8 {o['decode8_s'] / fh['decode8_s']:.2f}x")
print("(f32: the server's default, bf16-valued f32 weights kept in 16 bits, f32 KV cache; f32 held: every weight"
      " in f32; q8_0: --quantize q8_0 with its default f16 KV cache)")
print(f"the same photo request again: TTFT {ttft[1]:.3f} s, {ttft[0] / ttft[1]:.0f}x lower than the first")
print(f"concurrency 16 (detail low, 64 tokens): TTFT p50 {c16['ttft_p50_s']:.2f} s, p99 {c16['ttft_p99_s']:.2f} s;"
      " compared with transformers' batch-8 decode aggregate")
print("(ratios are speed: above 1 is Ocellus faster)")
PY
