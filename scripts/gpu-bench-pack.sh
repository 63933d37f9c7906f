#!/usr/bin/env bash
# Prepares what scripts/gpu-bench.sh needs on a GPU machine that has no Rust and no network:
#   .gpu/crossdiff.xz  the release binary, stripped and xz-compressed
#   .gl/*.deb          the Vulkan loader and GL dispatch packages (amd64), extracted there when missing
# Both folders are ignored through .git/info/exclude (not .gitignore) and travel with the working
# tree (64 MiB in all), so the sizes are printed at the end.
#
#   bash scripts/gpu-bench-pack.sh            # after cargo build --release
#   bash scripts/gpu-bench-pack.sh --no-debs  # the binary only
#   CROSSDIFF_BIN=path/to/crossdiff bash scripts/gpu-bench-pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=1
for a in "$@"; do
  case "$a" in
    --no-debs) DEBS=0 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "gpu-bench-pack: unknown argument '$a'" >&2; exit 2 ;;
  esac
done

TARGET="${CARGO_TARGET_DIR:-$HOME/.cache/crossdiff-target}"
BIN="${CROSSDIFF_BIN:-$TARGET/release/crossdiff}"
[ -x "$BIN" ] || { echo "gpu-bench-pack: $BIN not found; build it first: cargo build --release" >&2; exit 1; }

# Ignored, not committed: the local exclude file.
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
for p in /.gl/ /.gpu/; do
  grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >> "$exclude"
done

mkdir -p .gpu
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
strip -o "$tmp/crossdiff" "$BIN"
xz -T0 -9 -c "$tmp/crossdiff" > .gpu/crossdiff.xz.tmp
mv .gpu/crossdiff.xz.tmp .gpu/crossdiff.xz
echo "gpu-bench-pack: $BIN -> stripped $(stat -c %s "$tmp/crossdiff") bytes -> .gpu/crossdiff.xz $(stat -c %s .gpu/crossdiff.xz) bytes"
if command -v objdump >/dev/null; then
  glibc="$(objdump -T "$tmp/crossdiff" | grep -o 'GLIBC_[0-9.]*' | sort -t. -k2,2n -k3,3n -u | tail -n1)"
  echo "gpu-bench-pack: the binary needs glibc ${glibc#GLIBC_} or newer on the GPU machine"
fi

if [ "$DEBS" = 1 ]; then
  if ls .gl/*.deb >/dev/null 2>&1; then
    echo "gpu-bench-pack: .gl already holds $(ls .gl/*.deb | wc -l) packages (delete .gl to fetch them again)"
  else
    # As the device tool's README says: amd64 packages, lists kept apart from the system's.
    mkdir -p .gl /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    # shellcheck disable=SC2086
    apt-get $o update
    # shellcheck disable=SC2086
    (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
  fi
fi

# What travels: tracked and untracked-not-ignored files, shared/ if present, and the carried folders.
tree_bytes="$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s+=$1} END {print s+0}')"
shared_bytes=0
[ -d shared ] && shared_bytes="$(du -sb shared | cut -f1)"
gl_bytes=0
[ -d .gl ] && gl_bytes="$(du -sb .gl | cut -f1)"
gpu_bytes="$(du -sb .gpu | cut -f1)"
total=$((tree_bytes + shared_bytes + gl_bytes + gpu_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "gpu-bench-pack: working tree $(mib "$tree_bytes"), shared/ $(mib "$shared_bytes"), .gl $(mib "$gl_bytes"), .gpu $(mib "$gpu_bytes"): $(mib "$total") travel (limit 64 MiB)"
if [ "$total" -gt $((64 * 1048576)) ]; then
  echo "gpu-bench-pack: WARNING: over 64 MiB; the device run would be refused" >&2
  exit 1
fi
echo "gpu-bench-pack: on the GPU machine run: bash scripts/gpu-bench.sh   (carry .gl and .gpu)"
