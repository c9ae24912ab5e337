#!/usr/bin/env bash
# `comfy node validate` (the registry's check: pyproject's node configuration, then ruff's exec / eval /
# one-line-statements rules) on this clone, in a tools venv of pinned comfy-cli + ruff built once per
# machine in the cache folder (keyed by this script). The registry only warns on those rules; here any
# warning or error fails.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/attention-control
key=$(sha256sum "$here/scripts/validate.sh" | cut -c1-16)
venv=$cache/tools-$key
mkdir -p "$cache"
exec 9>"$cache/tools.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  echo "building the validation tools in $venv (one time per machine)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check comfy-cli==1.23.0 ruff==0.17.6 2> >(grep -v "^WARNING: Location" >&2)
  touch "$venv/.complete"
fi
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
cd "$here"
out=$(HOME="$home" PATH="$venv/bin:$PATH" "$venv/bin/comfy" --skip-prompt --no-enable-telemetry node validate \
      < /dev/null 2>&1) || { echo "$out"; echo "comfy node validate failed" >&2; exit 1; }
if grep -qiE "security warnings|error" <<< "$out"; then
  echo "$out"
  echo "comfy node validate: warnings or errors (above)" >&2
  exit 1
fi
echo "comfy node validate: passed"
