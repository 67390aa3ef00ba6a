#!/usr/bin/env bash
# The GPU checks (issue 9), in under 10 minutes on one GPU. Writes JSON into $OUT (default
# device-results/):
#   - the CUDA tests (a masked linear call on cuda:0 against the CPU backend, f32 and f64; a
#     cuda:0 stage answering through a local cluster),
#   - `talaria bench` for plain, remo f32 and remo f64-gemm with the cloud side's weights on the
#     CPU and on cuda:0, in the same run,
#   - `talaria lossless` (greedy agreement and logit drift against plain f32) on both backends,
#   - `talaria load --synthetic` (the gpu-nodes' batching, 1 and 16 sessions) on both backends.
#
# With cargo and the registry at hand it builds with `--features cuda`. On a machine without
# them (the lent GPU machines reach no registry), set BIN_DIR to a folder holding release builds
# made with the feature: talaria, gpu-node, coordinator, cvm-agent, and deps/cuda-* (the test
# binary): see `scripts/device-pack.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/device-results}"
mkdir -p "$OUT"
MODEL="${MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
export TALARIA_HOME="$(dirname "$MODEL")" TALARIA_REPO_ROOT="$ROOT"
# cudarc loads the CUDA libraries at run time: make every copy of NVRTC and the driver findable.
for d in $(find /usr/local /usr/lib /opt -name 'libnvrtc.so*' -printf '%h\n' 2>/dev/null | grep -v stubs | sort -u); do
  export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done

if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -p talaria -p talaria-gpu-node -p talaria-coordinator -p talaria-cvm-agent \
    --features talaria/cuda,talaria-gpu-node/cuda
  cargo test --release -p talaria-tests --features cuda --test cuda -- --test-threads 1 --nocapture \
    2>&1 | tee "$OUT/cuda-tests.log" || echo "CUDA TESTS FAILED"
  BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
else
  test_bin="$(ls "$BIN_DIR"/deps/cuda-* | head -1)"
  "$test_bin" --test-threads 1 --nocapture 2>&1 | tee "$OUT/cuda-tests.log" || echo "CUDA TESTS FAILED"
fi
T="$BIN_DIR/talaria"
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true) > "$OUT/device.txt"
nproc >> "$OUT/device.txt"

B="--prompt-tokens ${PROMPT_TOKENS:-128} --gen-tokens ${GEN_TOKENS:-64} --runs ${RUNS:-2} --model-file $MODEL"
# The ReMO precisions measured (f64-gemm needs an f64 GEMM, which burn-cuda 0.21 lacks: on cuda
# it is refused with a typed error; int runs its product on the CPU whatever the backend).
PRECISIONS="${PRECISIONS:-int,f32,f64-client,f64-gemm}"
for backend in ${BACKENDS:-cpu cuda:0}; do
  tag="${backend/:/}"
  echo "== $backend"
  "$T" bench --engine plain --backend "$backend" $B --out "$OUT/bench-plain-$tag.json" >/dev/null \
    || echo "bench plain $backend FAILED"
  for p in ${PRECISIONS//,/ }; do
    [ "$backend" != cpu ] && [ "$p" = f64-gemm ] && continue
    "$T" bench --engine remo --remo-precision "$p" --backend "$backend" $B \
      --out "$OUT/bench-remo-$p-$tag.json" >/dev/null || echo "bench remo $p $backend FAILED"
  done
  lossless=f32,f64-client
  # LOSSLESS_CPU= (set, empty) skips the CPU's lossless run.
  [ "$backend" = cpu ] && lossless="${LOSSLESS_CPU-f32,f64-client,f64-gemm}"
  [ -z "$lossless" ] && continue
  "$T" lossless --precisions "$lossless" --scales 100 --n-prompts "${N_PROMPTS:-10}" --max-tokens 32 \
    --backend "$backend" --model-file "$MODEL" --out "$OUT/lossless-$tag.json" >/dev/null \
    || echo "lossless $backend FAILED"
done
# The gpu-nodes' batching alone (issue 25, item 5): one-row calls of 1 and 16 sessions.
load_precisions="${LOAD_PRECISIONS:-f32,int}"
for backend in ${BACKENDS:-cpu cuda:0}; do
  tag="${backend/:/}"
  for p in ${load_precisions//,/ }; do
    "$T" load --synthetic --precision "$p" --backend "$backend" --tenants 1,16 \
      --gen-tokens "${LOAD_STEPS:-32}" --run-dir "/tmp/load-$p-$tag" \
      --json "$OUT/load-$p-$tag.json" >/dev/null || echo "load $p $backend FAILED"
  done
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {"device": (out / "device.txt").read_text().strip(), "bench": {}, "lossless": {}}
for f in sorted(out.glob("bench-*.json")):
    d = json.loads(f.read_text())
    summary["bench"][f.stem] = {k: d[k] for k in ("median_prefill_tok_per_s", "median_decode_tok_per_s")}
    summary["bench"][f.stem]["ids_head"] = d["ids"][:8]
for f in sorted(out.glob("load-*.json")):
    summary.setdefault("load", {})[f.stem] = [
        {k: step.get(k) for k in ("sessions", "tokens_per_s", "speedup_vs_one_session",
                                "calls_per_s", "answer_datagrams_lost")}
        for step in json.loads(f.read_text()).get("synthetic", [])
    ]
for f in sorted(out.glob("lossless-*.json")):
    summary["lossless"][f.stem] = json.loads(f.read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary["bench"], indent=1))
PY
