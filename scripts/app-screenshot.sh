#!/usr/bin/env bash
# Starts the real crossdiff app under Xvfb (software Vulkan through Mesa's lavapipe), screenshots
# each main view and fails if a screenshot is blank. Used by .ci/run; screenshots go to $1.
#   bash scripts/app-screenshot.sh OUT_DIR
set -euo pipefail
out=${1:-target/screenshots}
mkdir -p "$out"
bin="${CARGO_TARGET_DIR:-target}/release/crossdiff"
display=:97
Xvfb "$display" -screen 0 1280x800x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $xvfb 2>/dev/null || true' EXIT
sleep 2
for view in models cache train analyze latents plots promptlab steering compare adl methods; do
  DISPLAY=$display CROSSDIFF_VIEW=$view timeout 40 "$bin" >"$out/$view.log" 2>&1 &
  app=$!
  # The first frame needs the wgpu pipeline built on lavapipe: give it time.
  for _ in $(seq 1 30); do
    sleep 1
    DISPLAY=$display import -window root "$out/$view.png" 2>/dev/null || continue
    colors=$(convert "$out/$view.png" -format %k info:)
    [ "$colors" -gt 16 ] && break
  done
  kill $app 2>/dev/null || true
  wait $app 2>/dev/null || true
  colors=$(convert "$out/$view.png" -format %k info:)
  if [ "$colors" -le 16 ]; then
    echo "app-screenshot: the $view view looks blank ($colors colours); app log:" >&2
    cat "$out/$view.log" >&2
    exit 1
  fi
  echo "app-screenshot: $view view OK ($colors colours) -> $out/$view.png"
done
