#!/usr/bin/env bash
# crossdiff on a GPU (wgpu/Vulkan) against PyTorch/transformers on CUDA, on the same NVIDIA GPU, as one
# prepared command for a machine that has PyTorch + transformers but no Rust and no network.
#
#   bash scripts/gpu-bench.sh [--out FILE] [--budget SECONDS]   # on the GPU machine, from the repo root
#   bash scripts/gpu-bench.sh --dry-run [--out FILE]              # the same steps on the CPU at tiny sizes (CI)
#
# GPU run: needs .gpu/crossdiff.xz (a stripped release build, made here by scripts/gpu-bench-pack.sh)
# and, where the machine lacks libvulkan, the loader packages in .gl/*.deb (same script). It unpacks
# the binary, makes Vulkan work, builds a random Gemma 2 2B-shaped base/chat pair in bf16 with
# transformers, then times prefill/decode, caching at layer 13, the BatchTopK training step at the
# paper's size (d 2304, D 73,728, k 100, B 2048), analyze, and peak GPU memory; it finishes in under
# 8 minutes on an H100 (a time budget skips what no longer fits).
#
# Dry run: crossdiff from $CROSSDIFF_BIN, else $CARGO_TARGET_DIR/release/crossdiff, else
# ~/.cache/crossdiff-target/release/crossdiff, else target/release/crossdiff, on --backend cpu. With
# torch + transformers installed it builds a tiny random pair and runs the PyTorch side on the CPU;
# without them it uses the committed demo pair (assets/demo) and records the PyTorch side as skipped.
#
# Output: one JSON file, $OUT/gpu-bench.json when $OUT is set, else ./gpu-bench.json (--out FILE
# overrides), and one combined log beside it (same name, .log). Progress lines carry timestamps.
# A failed step is recorded (its error text in the JSON) and the run goes on. Exit status: 0 when every
# step that ran passed, 1 when one failed or no JSON could be written (the JSON is written either way).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
OUTFILE=""
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUTFILE="${2:?--out needs a file}"; shift ;;
    --out=*) OUTFILE="${1#--out=}" ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --budget=*) BUDGET="${1#--budget=}" ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "gpu-bench: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUTFILE" ]; then
  if [ -n "${OUT:-}" ]; then OUTFILE="$OUT/gpu-bench.json"; else OUTFILE="$ROOT/gpu-bench.json"; fi
fi
mkdir -p "$(dirname "$OUTFILE")"
OUTFILE="$(cd "$(dirname "$OUTFILE")" && pwd)/$(basename "$OUTFILE")"
LOG="${OUTFILE%.json}.log"
[ "$LOG" = "$OUTFILE" ] && LOG="$OUTFILE.log"
: > "$LOG"

log() { echo "[$(date +%H:%M:%S)] gpu-bench: $*" | tee -a "$LOG"; }
die() { log "ERROR: $*"; exit 1; }

# Large scratch (the 2B pair is ~10 GB): $GPU_BENCH_WORK, else $TMPDIR, else /tmp; removed at exit.
WORK="$(mktemp -d "${GPU_BENCH_WORK:-${TMPDIR:-/tmp}}/gpu-bench.XXXXXX")" || die "cannot create a scratch folder"
trap 'rm -rf "$WORK"' EXIT
NOTES=()
note() { NOTES+=("$*"); log "$*"; }

command -v python3 >/dev/null || die "python3 not found (the driver scripts/gpu_bench_run.py needs it)"
PY="${GPU_BENCH_PYTHON:-python3}"

# --- 1. the crossdiff binary --------------------------------------------------------------------
if [ -n "${CROSSDIFF_BIN:-}" ]; then
  BIN="$CROSSDIFF_BIN"
  note "crossdiff: \$CROSSDIFF_BIN = $BIN"
elif [ "$DRY" = 1 ]; then
  BIN=""
  for c in "${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/release/crossdiff}" \
           "$HOME/.cache/crossdiff-target/release/crossdiff" "$ROOT/target/release/crossdiff"; do
    if [ -n "$c" ] && [ -x "$c" ]; then BIN="$c"; break; fi
  done
  [ -n "$BIN" ] || die "no crossdiff binary: set CROSSDIFF_BIN or build with cargo build --release"
  note "crossdiff: $BIN"
else
  XZF="$ROOT/.gpu/crossdiff.xz"
  [ -f "$XZF" ] || die "$XZF missing: run scripts/gpu-bench-pack.sh where the binary was built, and carry .gpu"
  mkdir -p "$WORK/bin"
  BIN="$WORK/bin/crossdiff"
  if command -v xz >/dev/null; then
    xz -dc "$XZF" > "$BIN" || die "xz could not decompress $XZF"
  else
    python3 -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as f, open(sys.argv[2], "wb") as g:
    shutil.copyfileobj(f, g, 1 << 20)' "$XZF" "$BIN" || die "python lzma could not decompress $XZF"
  fi
  chmod +x "$BIN"
  note "crossdiff: unpacked $XZF ($(stat -c %s "$XZF") bytes) to $BIN ($(stat -c %s "$BIN") bytes)"
fi
[ -x "$BIN" ] || die "$BIN is not an executable file"

# --- 2. Vulkan (GPU run only) ---------------------------------------------------------------------
if [ "$DRY" = 0 ]; then
  # (no `grep -q` after a pipe here: under pipefail its early exit fails the pipeline with SIGPIPE)
  vk="$(ldconfig -p 2>/dev/null | grep 'libvulkan\.so\.1' | awk '{print $NF}' | head -n1)"
  if [ -n "$vk" ]; then
    note "vulkan: loader present ($vk)"
  elif ls "$ROOT"/.gl/*.deb >/dev/null 2>&1; then
    for f in "$ROOT"/.gl/*.deb; do dpkg -x "$f" / || log "dpkg -x $f failed"; done
    ldconfig
    if [ -n "$(ldconfig -p 2>/dev/null | grep 'libvulkan\.so\.1')" ]; then
      note "vulkan: extracted $(ls "$ROOT"/.gl/*.deb | wc -l) loader packages from .gl ($(cd "$ROOT/.gl" && ls *.deb | tr '\n' ' '))"
    else
      note "vulkan: extracted .gl/*.deb but ldconfig still finds no libvulkan"
    fi
  else
    note "vulkan: no libvulkan and no .gl/*.deb to extract: crossdiff's wgpu steps will fail"
  fi
  # A driver: an NVIDIA ICD in the loader's standard folders, else the mounted driver's own files.
  icd="$(ls /etc/vulkan/icd.d/*.json /usr/share/vulkan/icd.d/*.json /usr/local/share/vulkan/icd.d/*.json 2>/dev/null | grep -i nvidia | head -n1)"
  NV_ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  NV_EGL=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  if [ -n "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ]; then
    note "vulkan: driver from the environment: ${VK_DRIVER_FILES:-$VK_ICD_FILENAMES}"
  elif [ -n "$icd" ]; then
    note "vulkan: NVIDIA driver found at $icd"
  elif [ -f "$NV_ICD" ]; then
    export VK_DRIVER_FILES="$NV_ICD"
    note "vulkan: no NVIDIA ICD in the standard folders; VK_DRIVER_FILES=$NV_ICD"
    if [ -f "$NV_EGL" ]; then
      export __EGL_VENDOR_LIBRARY_FILENAMES="$NV_EGL"
      note "vulkan: __EGL_VENDOR_LIBRARY_FILENAMES=$NV_EGL"
    else
      note "vulkan: $NV_EGL not found (EGL vendor file not set)"
    fi
  else
    note "vulkan: no NVIDIA ICD found ($NV_ICD missing either); wgpu may not find the GPU"
  fi
  if command -v nvidia-smi >/dev/null; then
    log "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n1)"
  else
    note "nvidia-smi not found: no GPU memory sampling"
  fi
fi

# --- 3. PyTorch? -----------------------------------------------------------------------------------
if pyinfo="$("$PY" -c 'import torch, transformers, tokenizers, safetensors
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())' 2>&1)"; then
  TORCH=1
  log "python: $(echo "$pyinfo" | tail -n1)"
else
  TORCH=0
  note "python: torch/transformers not importable by $PY: the PyTorch side is skipped"
fi

# --- 4. the steps --------------------------------------------------------------------------------
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
args=(--bin "$BIN" --out "$OUTFILE" --log "$LOG" --work "$WORK" --torch "$TORCH" --python "$(command -v "$PY")"
      --setup-notes "$(printf '%s\n' "${NOTES[@]}")")
[ "$DRY" = 1 ] && args+=(--dry-run)
[ -n "$BUDGET" ] && args+=(--budget "$BUDGET")
python3 "$ROOT/scripts/gpu_bench_run.py" "${args[@]}"
rc=$?
if [ ! -s "$OUTFILE" ] || ! python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$OUTFILE" 2>/dev/null; then
  die "no valid JSON at $OUTFILE (driver exit status $rc)"
fi
failed="$(python3 -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1])).get("failed_steps") or []))' "$OUTFILE")"
log "JSON: $OUTFILE; log: $LOG"
if [ -n "$failed" ]; then
  log "failed steps: $failed (their errors are in the JSON)"
  exit 1
fi
exit 0
