#!/usr/bin/env bash
# Installs the system libraries Ocellus links, when they are missing: FFmpeg's libraries
# (video decoding, through the ffmpeg-next crate), pkg-config to find them and libclang,
# with which the crate generates its bindings at build time. Debian/Ubuntu packages; on
# other systems install the equivalents (FFmpeg >= 5 development files, pkg-config, clang).
#   scripts/system-deps.sh          # to build and run
#   scripts/system-deps.sh --test   # also what tests run: promtool (Debian's prometheus), and
#                                   # Chromium with its WebDriver for the chat page's browser test
set -euo pipefail

packages=(pkg-config clang libclang-dev libavcodec-dev libavformat-dev libavutil-dev libswscale-dev)
[ "${1:-}" = "--test" ] && packages+=(prometheus chromium chromium-driver)

if ! command -v dpkg >/dev/null; then
  pkg-config --exists libavcodec libavformat libavutil libswscale && exit 0
  echo "install FFmpeg's development files (libavcodec, libavformat, libavutil, libswscale), pkg-config and clang" >&2
  exit 1
fi
dpkg -s "${packages[@]}" >/dev/null 2>&1 && exit 0

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing ${packages[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
