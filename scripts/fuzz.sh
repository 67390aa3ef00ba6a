#!/usr/bin/env bash
# Fuzzes every decoder of untrusted input (stable Rust, talaria-fuzz): RUNS mutated inputs per
# target (default 1000000) from SEED (default 0), one target per core at a time. Writes the
# summary to docs/reliability/fuzz.json and any finding's input to target/fuzz-findings/.
# Exits non-zero if any target crashed or took too much memory.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-1000000}"
SEED="${2:-0}"
cargo build --release -p talaria-fuzz
BIN="${CARGO_TARGET_DIR:-target}/release/talaria-fuzz"
mkdir -p docs/reliability
"$BIN" --target all --runs "$RUNS" --seed "$SEED" \
  --out "${CARGO_TARGET_DIR:-target}/fuzz-findings" --json docs/reliability/fuzz.json
