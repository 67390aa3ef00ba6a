#!/usr/bin/env bash
# Packs what scripts/device-check.sh needs on a machine that reaches no registry and takes at
# most 64 MiB per call: the release binaries built with `--features cuda` (stripped, gzipped)
# into .dev-bin/, and the model split into .dev-m1/ and .dev-m2/. All three folders are ignored
# by git (.git/info/exclude) and travel as `carry` paths, one call each, back to back on one warm
# machine; the last call unpacks and runs:
#   mkdir -p bin/deps models && for f in .dev-bin/*.gz; do gunzip -c $f > bin/$(basename $f .gz); done
#   mv bin/cuda-* bin/deps/ && chmod +x bin/* bin/deps/*
#   cat .dev-m1/* .dev-m2/* > models/SmolLM2-135M-Instruct.Q4_1.gguf
#   BIN_DIR=$PWD/bin OUT=$OUT ./scripts/device-check.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
CARGO_TARGET_DIR="$TARGET" cargo build --release -p talaria -p talaria-gpu-node -p talaria-coordinator \
  -p talaria-cvm-agent --features talaria/cuda,talaria-gpu-node/cuda
CARGO_TARGET_DIR="$TARGET" cargo test --release -p talaria-tests --features cuda --test cuda --no-run
rm -rf .dev-bin .dev-m1 .dev-m2 && mkdir -p .dev-bin .dev-m1 .dev-m2
for b in talaria gpu-node coordinator cvm-agent; do
  strip -o ".dev-bin/$b" "$TARGET/release/$b"
done
test_bin="$(ls -t "$TARGET"/release/deps/cuda-* | grep -v '\.d$' | head -1)"
strip -o .dev-bin/cuda-test "$test_bin"
gzip -9 .dev-bin/*
model="$(ls models/*.gguf | head -1)"
split -b 50000000 -d "$model" .dev-m1/part.
mv .dev-m1/part.01 .dev-m2/
du -sh .dev-bin .dev-m1 .dev-m2
