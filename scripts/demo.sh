#!/usr/bin/env bash
# The main job: build, fetch the real model, and answer a prompt with it.
source "$(dirname "$0")/lib.sh"
ensure_rust
ensure_venv
build_release
fetch_model
PROMPT="${1:-Once upon a time, there was a little}"
"$TALARIA" generate --engine plain --prompt "$PROMPT" --max-tokens "${MAX_TOKENS:-25}"
