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

# llama.cpp's Python binding in the virtualenv (built from source: needs cmake, installed here if
# missing, and a C++ compiler), for the comparison benchmark.
ensure_llama_cpp() {
  if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake; }
    "$VENV/bin/pip" install --quiet -r tools/requirements-llamacpp.txt
  fi
}

# Starts `talaria up` ($1: the talaria binary) on topology/examples/local.toml with its [remo]
# precision set to $2 and $3 dummy rows (and $4, if given, as one more line of [remo]: then the
# agent serves no HTTPS API, which a configuration below the floor may not have), in a fresh
# folder, and waits until it is ready.
# Sets CLUSTER_DIR (its run folder is $CLUSTER_DIR/run) and CLUSTER_PID; stop_cluster ends it.
start_cluster() {
  CLUSTER_DIR="$(mktemp -d)"
  local no_http=()
  if [ -n "${4:-}" ]; then no_http=(-e '/^http = /d'); fi
  sed "${no_http[@]}" -e "s/^precision = \"int\"/precision = \"$2\"\ndummy_rows = $3\n${4:-}/" topology/examples/local.toml \
    > "$CLUSTER_DIR/topology.toml"
  "$1" up --topology "$CLUSTER_DIR/topology.toml" --run-dir "$CLUSTER_DIR/run" \
    > "$CLUSTER_DIR/up.log" 2>&1 &
  CLUSTER_PID=$!
  for _ in $(seq 1 600); do grep -q "^ready " "$CLUSTER_DIR/up.log" && break; sleep 0.5; done
  grep -q "^ready " "$CLUSTER_DIR/up.log" || { cat "$CLUSTER_DIR/up.log"; stop_cluster; return 1; }
}

stop_cluster() {
  kill "$CLUSTER_PID" 2>/dev/null || true
  wait "$CLUSTER_PID" 2>/dev/null || true
  rm -rf "$CLUSTER_DIR"
}
