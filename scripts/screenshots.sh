#!/usr/bin/env bash
# Builds a small project from the bundled fixtures with the CLI (cache, a BatchTopK and an L1
# crosscoder, analysis, KL) and screenshots every view of the real app on it into docs/screenshots.
#   bash scripts/screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/crossdiff-target}"
bin="$CARGO_TARGET_DIR/release/crossdiff"
proj=$(mktemp -d)
a=assets
"$bin" --backend cpu cache --base $a/tiny-gemma2/base --chat $a/tiny-gemma2/chat --data $a/data/web.txt $a/data/chat.jsonl \
  --mix --layer 2 --tokens 3000 --context 64 --shard-tokens 1024 --out "$proj/cache" >/dev/null
for kind in batchtopk l1; do
  "$bin" --backend cpu train --cache "$proj/cache" --out "$proj/runs/$kind" --kind $kind --dict-size 144 --k 8 --mu 0.02 \
    --batch 64 --steps 400 --warmup-steps 20 --threshold-start 100 --lr 2e-3 --dead-tokens 6400 >/dev/null
  "$bin" --backend cpu analyze --run "$proj/runs/$kind" --cache "$proj/cache" --base $a/tiny-gemma2/base --chat $a/tiny-gemma2/chat >/dev/null
  "$bin" --backend cpu kl --run "$proj/runs/$kind" --base $a/tiny-gemma2/base --chat $a/tiny-gemma2/chat --data $a/data/chat.jsonl \
    --conversations 20 >/dev/null
done
cat >"$proj/crossdiff-project.json" <<JSON
{"base": "$PWD/$a/tiny-gemma2/base", "chat": "$PWD/$a/tiny-gemma2/chat",
 "data": ["$PWD/$a/data/web.txt", "$PWD/$a/data/chat.jsonl"], "cache": "cache", "runs": ["runs/batchtopk", "runs/l1"]}
JSON
mkdir -p docs/screenshots
Xvfb :96 -screen 0 1400x900x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $xvfb 2>/dev/null || true; rm -rf "$proj"' EXIT
sleep 2
for view in models latents plots compare train; do
  DISPLAY=:96 CROSSDIFF_PROJECT="$proj" CROSSDIFF_VIEW=$view timeout 30 "$bin" >/dev/null 2>&1 &
  app=$!
  sleep 6
  DISPLAY=:96 import -window root -crop 1100x720+0+0 "docs/screenshots/$view.png"
  kill $app 2>/dev/null || true
  wait $app 2>/dev/null || true
  echo "docs/screenshots/$view.png"
done
