#!/usr/bin/env bash
# System packages crossdiff's tests and app need on Debian 12 (bookworm), as root:
# - Mesa's software Vulkan driver (lavapipe) for the wgpu backend on machines without a GPU, from
#   bookworm-backports: Mesa 25 there is ~4x faster than bookworm's 22.3, and 22.3's lavapipe
#   crashed on burn's SPIR-V pipelines;
# - the Vulkan loader; X11/xkb libraries, Xvfb and ImageMagick for the desktop app and its
#   screenshot check.
# Safe to re-run: does nothing when everything is present.
set -euo pipefail
need=()
ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || need+=(mesa)
for lib in libvulkan.so.1 libxkbcommon-x11.so.0 libX11-xcb.so.1 libXcursor.so.1 libXi.so.6 libXrandr.so.2; do
  ldconfig -p | grep -q "$lib" || need+=("$lib")
done
command -v Xvfb >/dev/null || need+=(xvfb)
command -v import >/dev/null || need+=(imagemagick)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install-system-deps: missing ${need[*]}; run this script as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
src=/etc/apt/sources.list.d/debian.sources
backports=/etc/apt/sources.list.d/crossdiff-backports.sources
if [ -f "$src" ] && [ ! -f "$backports" ] && grep -q 'bookworm' /etc/os-release; then
  # The machine's own Debian mirror, bookworm-backports suite (first stanza = the main archive).
  awk 'BEGIN{RS="";ORS="\n\n"} NR==1{sub(/Suites:[^\n]*/,"Suites: bookworm-backports"); print}' "$src" > "$backports"
fi
apt-get update -qq
pkgs=(libvulkan1 libxkbcommon-x11-0 libx11-xcb1 libxcursor1 libxi6 libxrandr2 xvfb imagemagick)
if [ -f "$backports" ]; then
  apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers >/dev/null
else
  apt-get install -y -qq mesa-vulkan-drivers >/dev/null
fi
apt-get install -y -qq "${pkgs[@]}" >/dev/null
echo "install-system-deps: installed Mesa lavapipe $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers) and X11 libraries"
