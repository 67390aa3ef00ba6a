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

# ansible-core and ansible-lint (ansible/requirements.txt) in their own virtualenv, for the
# provisioning test; reinstalled only when the requirements change. ansible-core 2.19 needs
# Python 3.11 or newer on the control host: the first such python3 on PATH is used.
ensure_ansible() {
  ANSIBLE_VENV="${TALARIA_ANSIBLE_VENV:-$ROOT/.venv-ansible}"
  local stamp="$ANSIBLE_VENV/.requirements.sha256" want py=""
  want="$(sha256sum ansible/requirements.txt | cut -d' ' -f1)"
  if [ ! -x "$ANSIBLE_VENV/bin/ansible-playbook" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    for candidate in python3 python3.13 python3.12 python3.11; do
      if command -v "$candidate" >/dev/null &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        py="$candidate"
        break
      fi
    done
    [ -n "$py" ] || { echo "ansible-core needs Python 3.11 or newer; none found on PATH" >&2; exit 1; }
    rm -rf "$ANSIBLE_VENV"
    "$py" -m venv "$ANSIBLE_VENV"
    "$ANSIBLE_VENV/bin/pip" install --quiet --disable-pip-version-check -r ansible/requirements.txt
    echo "$want" > "$stamp"
  fi
  export TALARIA_ANSIBLE_VENV="$ANSIBLE_VENV"
}

build_release() {
  cargo build --release --workspace --locked
}

fetch_model() {
  MODEL="$("$TALARIA" fetch-model)"
  export MODEL
}
