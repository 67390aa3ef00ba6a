#!/usr/bin/env bash
# Issue 23's numbers in one run (docs/performance.md, "Verifying every product and hiding the
# length"): in process, the CVM's pad work and Freivalds' check per decode token with 0 and 2 dummy
# rows and each length-padding policy's prefill cost (`talaria bench-verify`); then decode through a
# local cluster with 0 and 2 dummy rows (`talaria up` + `talaria bench --engine cluster`).
# BEFORE=/path/to/talaria: a binary built before the change (dummy rows as canaries with their
# products), measured in the same run for the before/after rows.
source "$(dirname "$0")/lib.sh"
ensure_rust
build_release
fetch_model
OUT="${OUT:-bench-results/verify}"
mkdir -p "$OUT"
PROMPT_TOKENS="${PROMPT_TOKENS:-128}"
GEN_TOKENS="${GEN_TOKENS:-32}"

"$TALARIA" bench-verify --prompt-tokens "$PROMPT_TOKENS" --gen-tokens "$GEN_TOKENS" \
  --out "$OUT/in-process.json" > /dev/null

# The in-process engine, the same flags for both binaries.
for dummies in 0 2; do
  "$TALARIA" bench --engine remo --remo-dummy-rows "$dummies" --prompt-tokens "$PROMPT_TOKENS" \
    --gen-tokens "$GEN_TOKENS" --runs 2 --out "$OUT/remo-d$dummies.json" > /dev/null
  if [ -n "${BEFORE:-}" ]; then
    "$BEFORE" bench --engine remo --remo-precision int --remo-dummy-rows "$dummies" \
      --prompt-tokens "$PROMPT_TOKENS" --gen-tokens "$GEN_TOKENS" --runs 2 \
      --out "$OUT/before-remo-d$dummies.json" > /dev/null
  fi
done

# The cluster: the local topology with the integer default and 0 or 2 dummy rows.
cluster() { # $1: the talaria binary, $2: dummy rows, $3: output name
  start_cluster "$1" int "$2"
  "$1" bench --engine cluster --cluster-dir "$CLUSTER_DIR/run" --allow-insecure-agent \
    --prompt-tokens "$PROMPT_TOKENS" --gen-tokens "$GEN_TOKENS" --runs 2 --out "$OUT/$3.json" > /dev/null
  stop_cluster
}
for dummies in 0 2; do
  cluster "$TALARIA" "$dummies" "cluster-d$dummies"
  if [ -n "${BEFORE:-}" ]; then cluster "$BEFORE" "$dummies" "before-cluster-d$dummies"; fi
done

python3 - "$OUT" <<'PY' | tee "$OUT/tables.md"
import json, os, sys
out = sys.argv[1]
r = json.load(open(f"{out}/in-process.json"))
print("| dummy rows | pairs / decode token | pad ms / decode token | verify ms / decode token | rows / decode token |")
print("|---|---|---|---|---|")
for d in r["decode"]:
    print(f"| {d['dummy_rows']} | {d['pairs_per_decode_token']:.0f} | {d['pad_ms_per_decode_token']:.1f} | {d['verify_ms_per_decode_token']:.2f} | {d['rows_per_decode_token']:.0f} |")
print()
print("| engine | prefill tok/s | decode tok/s |")
print("|---|---|---|")
for name in ["before-remo-d2", "before-remo-d0", "remo-d2", "remo-d0",
             "before-cluster-d2", "before-cluster-d0", "cluster-d2", "cluster-d0"]:
    p = f"{out}/{name}.json"
    if os.path.exists(p):
        j = json.load(open(p))
        print(f"| {name} | {j['median_prefill_tok_per_s']:.1f} | {j['median_decode_tok_per_s']:.2f} |")
print()
print("| policy | prompt tokens | rows per op | prefill ms | cloud ms |")
print("|---|---|---|---|---|")
for p in r["padding"]:
    print(f"| {p['policy']} | {p['prompt_tokens']} | {p['rows_sent_per_op']} | {p['prefill_ms']:.0f} | {p['cloud_ms']:.0f} |")
print()
print("| policy | lengths | prefill rows / real rows, per prompt | all rows / all real rows | bits the cloud reads | bits of the length |")
print("|---|---|---|---|---|---|")
for h in r["hiding"]:
    print(f"| {h['policy']} | {h['distribution']} | {h['mean_overhead']:.2f} | {h['work_overhead']:.2f} | {h['bits_seen']:.2f} | {h['bits_of_length']:.2f} |")
PY
