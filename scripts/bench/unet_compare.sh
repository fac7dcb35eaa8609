#!/usr/bin/env bash
# Runs the SD 1.5 UNet benchmark on candle (`farm bench unet`) and on PyTorch/diffusers
# (scripts/bench/unet_torch.py) in one session, one after the other, and prints the ratio
# candle / PyTorch (below 1.0: candle is faster).
#
#   scripts/bench/unet_compare.sh [--batch 2] [--dtype f32] [--runs 3] [--device cpu] [--engine auto]
#
# --engine: the farm's UNet, auto (its own CPU UNet on the CPU in f32, candle-transformers'
# otherwise), cpu or candle.
#
# FARM: the farm binary (default: $CARGO_TARGET_DIR or target, release if built, else debug).
# PYTHON: a Python with torch + diffusers (default: /var/tmp/parity-venv/bin/python).
# THREADS: PyTorch's threads (default: nproc; candle uses every core too).
set -euo pipefail
cd "$(dirname "$0")/../.."
BATCH=2 DTYPE=f32 RUNS=3 DEVICE=cpu ENGINE=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --batch) BATCH=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --engine) ENGINE=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${FARM:-}" ]; then
  if [ -x "$TARGET/release/farm" ]; then FARM=$TARGET/release/farm; else FARM=$TARGET/debug/farm; fi
fi
PYTHON=${PYTHON:-/var/tmp/parity-venv/bin/python}
THREADS=${THREADS:-$(nproc)}
TORCH_DEVICE=$DEVICE
[ "$DEVICE" = cuda ] && TORCH_DEVICE=cuda:0

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "farm: $FARM bench unet --arch sd15 --batch $BATCH --dtype $DTYPE --runs $RUNS --device $DEVICE --engine $ENGINE" >&2
CANDLE=$("$FARM" bench unet --arch sd15 --batch "$BATCH" --dtype "$DTYPE" --runs "$RUNS" --device "$DEVICE" --engine "$ENGINE" --json)
echo "$CANDLE"
echo "pytorch: $PYTHON scripts/bench/unet_torch.py --batch $BATCH --dtype $DTYPE --runs $RUNS --threads $THREADS --device $TORCH_DEVICE" >&2
TORCH=$(OMP_NUM_THREADS=$THREADS "$PYTHON" scripts/bench/unet_torch.py --batch "$BATCH" --dtype "$DTYPE" --runs "$RUNS" --threads "$THREADS" --device "$TORCH_DEVICE")
echo "$TORCH"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$PYTHON" - "$CANDLE" "$TORCH" <<'PY'
import json, sys
c, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({
    "candle_s": c["seconds"], "pytorch_s": t["seconds"],
    "ratio": round(c["seconds"] / t["seconds"], 3),
    "candle_peak_rss_mib": c["peak_rss_mib"], "pytorch_peak_rss_mib": t["peak_rss_mib"],
    "memory_ratio": round(c["peak_rss_mib"] / t["peak_rss_mib"], 3),
}, indent=2))
PY
