#!/usr/bin/env bash
# Screenshots of the real app's views on the demo project (`crossdiff demo` on the committed
# miniature pair in assets/demo), under Xvfb, into docs/screenshots. The app opens at 85% of the
# 1400×900 screen, centred: the crop is that window.
#   bash scripts/screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/crossdiff-target}"
bin="$CARGO_TARGET_DIR/release/crossdiff"
proj=$(mktemp -d)
"$bin" --backend cpu demo --project "$proj" --no-app >/dev/null
mkdir -p docs/screenshots
Xvfb :96 -screen 0 1400x900x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $xvfb 2>/dev/null || true; rm -rf "$proj"' EXIT
sleep 2
for view in models latents plots compare train analyze; do
  DISPLAY=:96 CROSSDIFF_PROJECT="$proj" CROSSDIFF_VIEW=$view timeout 30 "$bin" >/dev/null 2>&1 &
  app=$!
  sleep 6
  DISPLAY=:96 import -window root -crop 1190x765+105+67 "docs/screenshots/$view.png"
  kill $app 2>/dev/null || true
  wait $app 2>/dev/null || true
  echo "docs/screenshots/$view.png"
done
