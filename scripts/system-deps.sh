#!/usr/bin/env bash
# System packages the tests need (Debian/Ubuntu): headless Chromium and its WebDriver for the
# browser test, espeak-ng for test speech, sox for inspecting audio by hand.
# Idempotent: installs only what is missing, and runs `apt-get update` only then.
set -euo pipefail

PACKAGES=(chromium chromium-driver espeak-ng sox)

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "system-deps: all present (${PACKAGES[*]})"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null; then
    SUDO=(sudo)
else
    echo "system-deps: missing ${missing[*]}; run this script as root to install them" >&2
    exit 1
fi

echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q "${missing[@]}"
