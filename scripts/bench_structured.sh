#!/usr/bin/env bash
# The cost of constrained decoding: the serving benchmark at one concurrency, every request
# under a JSON schema (an array of 30 to 60 small objects: keys, enums, bounded integers,
# short strings; more than MAX_TOKENS tokens, so that no request ends early) against the
# same requests unconstrained, in alternating turns (this machine's speed drifts):
#   scripts/bench_structured.sh MODEL_DIR [ROUNDS] [CONCURRENCY]
# Prints one JSON line per turn: output tokens/s, and with the schema the grammar masks' time
# per step (p50, p99) from the server's ocellus_grammar_mask_duration_seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1
rounds=${2:-2}
concurrency=${3:-16}
max_tokens=${MAX_TOKENS:-64}
schema='{"type": "json_schema", "json_schema": {"name": "animals", "schema": {"type": "array", "minItems": 30, "maxItems": 60,
  "items": {"type": "object", "additionalProperties": false, "required": ["name", "kind", "age"],
  "properties": {"name": {"type": "string", "maxLength": 12}, "kind": {"enum": ["cat", "dog", "bird"]},
  "age": {"type": "integer", "minimum": 0, "maximum": 30}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}}}}}}'
cargo bench --bench serving --no-run >/dev/null 2>&1
run() {
  cargo bench --bench serving -- --model "$model" --concurrency "$concurrency" --requests $((2 * concurrency)) \
    --max-tokens "$max_tokens" "$@" 2>/dev/null |
    python3 -c 'import json, sys; r = json.load(sys.stdin); l = r["levels"][0]
print(json.dumps({"schema": r["response_format"], "output_tokens_per_s": round(l["output_tokens_per_s"], 1),
  "itl_p50_s": l.get("itl_p50_s"), "grammar_mask_seconds": r["grammar_mask_seconds"]}))'
}
for round in $(seq "$rounds"); do
  run
  run --response-format "$schema"
done
