#!/usr/bin/env bash
# Install the browser that `make test-browser` drives: Debian/Ubuntu's own Chromium, from the package manager.
# Playwright (pinned in requirements.txt) launches it by path, so no browser is ever downloaded by Playwright.
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root, or sudo without a password.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    echo "install_browser: $CHROMIUM is present ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: $CHROMIUM is missing and there is no apt-get here." >&2
    echo "  Install Chromium with your system's package manager so that $CHROMIUM exists, then re-run." >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "install_browser: $CHROMIUM is missing and installing it needs root." >&2
    echo "  Run: sudo apt-get update && sudo apt-get install -y chromium   (then re-run make test-browser)" >&2
    exit 1
fi

echo "install_browser: installing Chromium with apt-get (about a minute)"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium

if [ ! -x "$CHROMIUM" ]; then
    # Ubuntu ships the package as `chromium-browser` (a snap shim); Playwright needs a real binary here.
    echo "install_browser: apt-get finished but $CHROMIUM is still missing; install a Chromium build that provides it." >&2
    exit 1
fi
echo "install_browser: installed $("$CHROMIUM" --version 2>/dev/null)"
