#!/usr/bin/env bash
# System packages for the end-to-end browser test (tests/test_browser.py): Debian's Chromium, which
# Playwright drives through executable_path, and a font so screenshots have legible text. Never a
# downloaded browser (no `playwright install`). Idempotent: does nothing once /usr/bin/chromium
# exists. Needs root (CI and the dev machines run as root) or sudo.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version
