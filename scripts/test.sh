#!/usr/bin/env bash
# The test suite: formatting, the independent reference against the checked-in goldens, and every
# Rust test (unit, tiny model, real model, real processes, the ansible playbooks run for real), and a
# compile check of the cuda feature.
source "$(dirname "$0")/lib.sh"
ensure_rust
ensure_venv
ensure_ansible
cargo fmt --all -- --check
build_release
fetch_model
echo "== reference forward pass (float64 numpy) against tests/golden/greedy.json"
"$VENV/bin/python" tools/reference.py "$MODEL" tests/golden/prompts.json --check tests/golden/greedy.json
echo "== cargo test"
cargo test --release --workspace --locked
echo "== the cuda feature compiles (the GPU tests themselves run with scripts/device-check.sh)"
cargo check --release --locked -p talaria -p talaria-tests --features talaria/cuda,talaria-tests/cuda --tests
