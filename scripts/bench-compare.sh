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
./target/release/talaria bench --prompt-tokens "${PROMPT_TOKENS:-128}" --gen-tokens "${GEN_TOKENS:-64}" \
  --runs "${RUNS:-3}" --out "$OUT/talaria-plain.json" > /dev/null
"$VENV/bin/python" tools/bench_llamacpp.py "$MODEL" "$OUT/talaria-plain.json" > "$OUT/llama-cpp.json"
"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.load(open(f"{out}/{n}.json")) for n in ("talaria-plain", "llama-cpp")]
print(f"{'engine':32} {'prefill tok/s':>14} {'decode tok/s':>13}")
for r in rows:
    print(f"{r['engine']:32} {r['median_prefill_tok_per_s']:14.1f} {r['median_decode_tok_per_s']:13.1f}")
print(f"leading greedy ids on which llama.cpp agrees with talaria: {rows[1]['greedy_ids_agreeing_with_talaria']} of {rows[0]['gen_tokens']}")
PY
