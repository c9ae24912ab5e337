#!/usr/bin/env bash
# Installs Debian's Chromium (for tests/test_browser.py) when /usr/bin/chromium is missing.
# Non-interactive; needs root (CI runs as root on a clean Debian machine) or passwordless sudo.
# Playwright (requirements-host.txt) drives this browser; it never downloads one of its own.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "scripts/browser.sh: /usr/bin/chromium is missing and this user cannot run apt-get" >&2
    exit 1
  fi
fi
echo "installing Debian's chromium (one time per machine)" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >&2
$sudo apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >&2
/usr/bin/chromium --version >&2
