#!/usr/bin/env bash
# Installs Debian's Chromium and its chromedriver for the browser test suite (pytest -m browser),
# and curl, which runs the commands the page copies. The tests drive these system binaries;
# nothing downloads a browser at test time. Already installed: nothing to do. Needs root, or sudo
# where it is available.
set -euo pipefail
if command -v chromedriver >/dev/null && command -v curl >/dev/null \
    && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
  exit 0
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null; then
    echo "install_browser.sh: not root and no sudo; install chromium and chromium-driver with apt-get as root" >&2
    exit 1
  fi
  as_root=(sudo)
fi
"${as_root[@]}" apt-get update -q
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver curl
