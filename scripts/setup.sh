#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with homebake installed, and the default
# model fetched once into the user cache. `scripts/setup.sh test` also installs the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="plots"
[[ "${1:-}" == "test" ]] && extras="plots,test"

python="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)

# Skip pip entirely when nothing that decides the install has changed since the last run.
stamp=".venv/.homebake-setup-$extras"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  # torch is pinned: on this kind of machine 2.13.0 is a local CPU wheel; anything else pulls a CUDA build.
  "${pip[@]}" install torch==2.13.0
  "${pip[@]}" install -e ".[$extras]"
  echo "$want" > "$stamp"
fi

# Real consumers used by tests, from Debian's packages when missing (each test skips when its tool is absent):
# Chromium renders report.html; Go's text/template renders the Ollama Modelfile TEMPLATE.
if [[ "${1:-}" == "test" ]] && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v go >/dev/null || missing+=(golang-go)
  if (( ${#missing[@]} )); then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "setup: could not install ${missing[*]}; the tests that need them will be skipped" >&2
  fi
fi

.venv/bin/homebake setup
