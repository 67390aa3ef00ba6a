#!/usr/bin/env bash
# Prefill and decode speed of talaria's plain engine and of llama.cpp, on the same GGUF, prompt ids
# and machine, in one run. Installs llama-cpp-python (built from source: needs cmake) into the venv.
source "$(dirname "$0")/lib.sh"
ensure_rust
ensure_venv
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake; }
  "$VENV/bin/pip" install --quiet -r tools/requirements-llamacpp.txt
fi
build_release
fetch_model
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
"$TALARIA" bench --prompt-tokens "${PROMPT_TOKENS:-128}" --gen-tokens "${GEN_TOKENS:-64}" \
  --runs "${RUNS:-3}" --out "$OUT/talaria-plain.json" > /dev/null
"$VENV/bin/python" tools/bench_llamacpp.py "$MODEL" "$OUT/talaria-plain.json" > "$OUT/llama-cpp.json"
# The masked engine in its three precision modes, on the same prompt.
for mode in f32 f64-client f64-gemm; do
  "$TALARIA" bench --engine remo --remo-precision "$mode" \
    --prompt-tokens "${PROMPT_TOKENS:-128}" --gen-tokens "${GEN_TOKENS:-64}" --runs "${RUNS:-3}" \
    --out "$OUT/talaria-remo-$mode.json" > /dev/null
done
"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
names = ("talaria-plain", "llama-cpp", "talaria-remo-f32", "talaria-remo-f64-client", "talaria-remo-f64-gemm")
rows = [json.load(open(f"{out}/{n}.json")) for n in names]
print(f"{'engine':32} {'prefill tok/s':>14} {'decode tok/s':>13}")
for n, r in zip(names, rows):
    print(f"{n:32} {r['median_prefill_tok_per_s']:14.1f} {r['median_decode_tok_per_s']:13.1f}")
print(f"leading greedy ids on which llama.cpp agrees with talaria: {rows[1]['greedy_ids_agreeing_with_talaria']} of {rows[0]['gen_tokens']}")
PY
