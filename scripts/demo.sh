#!/usr/bin/env bash
# The main job: build, fetch the real model, bring up a local cluster on loopback (the
# coordinator, two gpu-node stages splitting the 30 layers, one tenant's cvm-agent, all talking
# QUIC) and answer a prompt through it with ReMO. The answer's greedy ids are then checked
# against the unprotected engine's (--engine plain); the cluster is stopped on exit.
source "$(dirname "$0")/lib.sh"
ensure_rust
ensure_venv
build_release
fetch_model
PROMPT="${1:-What is the capital of France?}"
MAX_TOKENS="${MAX_TOKENS:-32}"
TOPOLOGY="${TOPOLOGY:-topology/examples/local.toml}"
RUN_DIR="$(mktemp -d)"
UP_LOG="$RUN_DIR/up.log"

"$TALARIA" up --topology "$TOPOLOGY" --run-dir "$RUN_DIR" >"$RUN_DIR/up.out" 2>"$UP_LOG" &
UP_PID=$!
trap 'kill "$UP_PID" 2>/dev/null; wait "$UP_PID" 2>/dev/null; rm -rf "$RUN_DIR"' EXIT
echo "== starting the local cluster ($TOPOLOGY)"
until grep -q '^ready' "$RUN_DIR/up.out" 2>/dev/null; do
  if ! kill -0 "$UP_PID" 2>/dev/null; then
    cat "$UP_LOG" >&2
    exit 1
  fi
  sleep 1
done
cat "$UP_LOG"

echo "== tenant -> cvm-agent -> coordinator -> gpu-node stages (QUIC, ReMO-masked)"
"$TALARIA" generate --engine cluster --cluster-dir "$RUN_DIR" --allow-insecure-agent --chat --prompt "$PROMPT" \
  --max-tokens "$MAX_TOKENS"
cluster_json="$("$TALARIA" generate --engine cluster --cluster-dir "$RUN_DIR" --allow-insecure-agent --chat \
  --prompt "$PROMPT" --max-tokens "$MAX_TOKENS" --json)"
plain_json="$("$TALARIA" generate --engine plain --chat --prompt "$PROMPT" \
  --max-tokens "$MAX_TOKENS" --json)"
python3 - "$cluster_json" "$plain_json" <<'PY'
import json, sys
cluster, plain = json.loads(sys.argv[1]), json.loads(sys.argv[2])
lat, n = cluster["latency"], cluster["generated_tokens"]
ms = lambda k: 1e3 * lat[k] / n
print(f"== per token (mean of {n}, prefill included; {lat['calls']} masked calls): "
      f"CVM {ms('cvm_compute_s'):.0f} ms, masking {ms('masking_s'):.0f} ms, "
      f"gpu {ms('gpu_compute_s'):.0f} ms, network {ms('network_s'):.0f} ms")
if cluster["ids"] != plain["ids"]:
    sys.exit(f"MISMATCH: cluster ids {cluster['ids']} != plain ids {plain['ids']}")
print(f"== greedy ids equal --engine plain ({len(plain['ids'])} tokens)")
PY
