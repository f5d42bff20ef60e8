#!/usr/bin/env bash
# Install the browser the web-extension test drives (tests/test_browser.py): Debian's chromium + chromium-driver.
#
# Usage:  bash .ci/install_browser.sh      (as root, or with sudo available; Debian/Ubuntu, apt)
#
# Does nothing when /usr/bin/chromium and /usr/bin/chromedriver are already there. The Python side (selenium)
# comes with the package's `dev` extra, which `make test` installs.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "chromium and chromedriver already installed: $(/usr/bin/chromium --version 2>/dev/null || true)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_browser.sh: no apt-get here; install Chromium and its chromedriver at /usr/bin yourself" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >&2
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
echo "installed: $(/usr/bin/chromium --version 2>/dev/null || true)" >&2
