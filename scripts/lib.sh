# Shared set-up for the scripts: a Python virtualenv with the reference's packages, the release
# build, and the model in the cache. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${TALARIA_VENV:-$ROOT/.venv}"
TALARIA="${CARGO_TARGET_DIR:-$ROOT/target}/release/talaria"

ensure_rust() {
  command -v cargo >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; exit 1; }
}

# A virtualenv with tools/requirements.txt; reinstalled only when the requirements change.
ensure_venv() {
  local stamp="$VENV/.requirements.sha256" want
  want="$(sha256sum tools/requirements.txt | cut -d' ' -f1)"
  if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tools/requirements.txt
    echo "$want" > "$stamp"
  fi
  # The model fetch runs pip through this interpreter.
  export TALARIA_PYTHON="$VENV/bin/python"
}

build_release() {
  cargo build --release --workspace --locked
}

fetch_model() {
  MODEL="$("$TALARIA" fetch-model)"
  export MODEL
}
