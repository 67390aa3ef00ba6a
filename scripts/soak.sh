#!/usr/bin/env bash
# Soak and chaos (loopback only, bounded in time): TENANTS × SESSIONS greedy generations for
# MINUTES against a local cluster with two replicas of every stage, while a random gpu-node or the
# coordinator is SIGKILLed every ~KILL_EVERY_S seconds (the launcher restarts it). Every answer
# is checked against the plain engine's; writes docs/reliability/soak.json and exits non-zero on
# any wrong or lost answer.
#   scripts/soak.sh [MINUTES] [TENANTS] [SESSIONS] [KILL_EVERY_S] [SEED]
source "$(dirname "$0")/lib.sh"
ensure_rust
ensure_venv
build_release
fetch_model
mkdir -p docs/reliability
"$TALARIA" soak --minutes "${1:-10}" --tenants "${2:-2}" --sessions "${3:-2}" \
  --kill-every-s "${4:-20}" --seed "${5:-0}" --json docs/reliability/soak.json
