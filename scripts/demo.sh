#!/usr/bin/env bash
# The main job: build, fetch the real model, and answer a prompt with it — first unprotected
# (--engine plain), then through ReMO (--engine remo: the CVM side and the cloud side joined only
# by masked messages, with the embedded default parameters and calibration). The two answers are
# the same greedy tokens.
source "$(dirname "$0")/lib.sh"
ensure_rust
ensure_venv
build_release
fetch_model
PROMPT="${1:-Once upon a time, there was a little}"
echo "== plain"
"$TALARIA" generate --engine plain --prompt "$PROMPT" --max-tokens "${MAX_TOKENS:-25}"
echo "== remo (full-rank masks, σ = 100, f64 GEMM, canary rows, shuffle)"
"$TALARIA" generate --engine remo --prompt "$PROMPT" --max-tokens "${MAX_TOKENS:-25}"
