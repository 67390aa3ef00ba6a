#!/usr/bin/env bash
# Fairness: one tenant decodes while a neighbour tenant sends back-to-back long prompts
# (`talaria load --neighbour-prompt-tokens`), once per prefill_chunk asked, alternated ROUNDS
# times. The neighbour's agent is pinned to the last core and the rest of the cluster to the
# others, standing in for a CVM of its own (needs `taskset`, at least 2 cores). Writes
# bench-results/fairness-<chunk>-<round>.json; each holds the tenant's latencies alone and
# beside the neighbour (docs/serving.md, "Fairness").
#   scripts/fairness.sh [PROMPT_TOKENS] [CHUNKS] [ROUNDS]      e.g. 2000 "0 256" 2
source "$(dirname "$0")/lib.sh"
ensure_rust
build_release
fetch_model
tokens="${1:-2000}"
chunks="${2:-0 256}"
rounds="${3:-2}"
last=$(( $(nproc) - 1 ))
if (( last < 1 )); then
  echo "needs at least 2 cores" >&2
  exit 1
fi
mkdir -p bench-results
for round in $(seq 1 "$rounds"); do
  for c in $chunks; do
    run_dir=$(mktemp -d)
    "$TALARIA" load --tenants 1 --gen-tokens 48 --neighbour-prompt-tokens "$tokens" \
      --prefill-chunk "$c" --run-dir "$run_dir" \
      --json "bench-results/fairness-$c-$round.json" > "$run_dir/load.log" 2>&1 &
    load=$!
    # The neighbour is the last agent (tenant-01); pin once the cluster is up.
    for _ in $(seq 1 300); do
      sleep 1
      pgrep -f "cvm-agent.*tenant-01" > /dev/null && break
    done
    sleep 2
    for pid in $(pgrep -f "release/(cvm-agent|gpu-node|coordinator)"); do
      taskset -a -p -c "0-$(( last - 1 ))" "$pid" > /dev/null
    done
    for pid in $(pgrep -f "cvm-agent.*tenant-01"); do
      taskset -a -p -c "$last" "$pid" > /dev/null
    done
    wait "$load" || { cat "$run_dir/load.log" >&2; exit 1; }
    echo "prefill_chunk $c, round $round:"
    grep -E "tok/s|beside" "$run_dir/load.log"
    rm -rf "$run_dir"
  done
done
