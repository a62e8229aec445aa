#!/usr/bin/env bash
# GPU benchmark of the Next-DiT at NewBie-image-Exp0.1 size, on a CUDA machine whose python3 has
# PyTorch 2.11 (CUDA build): newbie-bench links against that torch's libtorch at run time.
#
#   cargo build -p farm-worker --bin newbie-bench --release     # here, after eval "$(cargo xtask env)"
#   worker/bench/gpu_bench.sh [OUTDIR]                          # there
#
# Runs, each printing one JSON object, most important first: the block-kernel and attention-backend
# variants side by side in one process (1024x1024 bf16, cond + uncond rows); 1024x1024 bf16 with
# CFG at batch 1 with libtorch's attention order and with cuDNN first, fp16 at batch 1, batch 2 and 4
# (256 caption tokens, uncond as long: no padding), batch 1 with a padded 8-token uncond caption
# (masked attention kernel), the conditioning prepared once per batch against at every step, and the side-by-side with the PyTorch eager script on the same GPU
# (bf16, batch of 2 rows).
#
# Each run is stopped after RUN_TIMEOUT seconds (default 150); typical full-size runs take 15-40 s.
# PRESET, DEVICE, SIZE (pixels), CAP (caption tokens) and MATMUL (side of the raw matmul) override
# the full-size settings; the worker's test suite runs this script with PRESET=tiny DEVICE=cpu
# SIZE=64 CAP=8 MATMUL=128 so that it cannot rot between GPU runs.
set -u
BIN=${BIN:-target/release/newbie-bench}
OUTDIR=${1:-${OUT:-/tmp/newbie-bench}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
PRESET=${PRESET:-newbie-exp0.1}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-1024}
CAP=${CAP:-256}
if [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.txt"
fi

run() {
  local name=$1; shift
  echo "== $name: $*"
  timeout "${RUN_TIMEOUT:-150}" "$BIN" "$@" --json > "$OUTDIR/$name.json" 2> "$OUTDIR/$name.err"
  local rc=$?
  cat "$OUTDIR/$name.json"; tail -5 "$OUTDIR/$name.err"
  echo "rc=$rc"
  [ "$rc" -eq 0 ] || FAILED="$FAILED $name"
}
FAILED=""

BASE=(--preset "$PRESET" --random-weights --device "$DEVICE" --width "$SIZE" --height "$SIZE" --cfg --cap-len "$CAP" ${MATMUL:+--matmul-size "$MATMUL"})
COMMON=("${BASE[@]}" --precision bf16)
run variants --variants unfused,fused,fused+gqa,fused+cudnn,fused+gqa+cudnn,fused+efficient,fused+flash \
  "${COMMON[@]}" --batch 1 --iters 6 --warmup 2 --matmul-iters 5 --breakdown
run b1 "${COMMON[@]}" --batch 1 --steps 8 --warmup 3
run b1_cudnn "${COMMON[@]}" --batch 1 --steps 8 --warmup 3 --attention-backend cudnn
run b1_fp16_cudnn "${BASE[@]}" --precision fp16 --batch 1 --steps 8 --warmup 3 --attention-backend cudnn
run b2 "${COMMON[@]}" --batch 2 --steps 6 --warmup 2 --matmul-iters 5
run b4 "${COMMON[@]}" --batch 4 --steps 4 --warmup 2 --matmul-iters 5
run b1_padded_uncond "${COMMON[@]}" --batch 1 --steps 8 --warmup 2 --uncond-len $((CAP > 8 ? 8 : CAP / 2)) --matmul-iters 5
run prepared "${COMMON[@]}" --prepare-baseline --batch 1 --steps 4 --iters 3 --warmup 1 --uncond-len $((CAP > 8 ? 8 : CAP / 2))
run compare_bf16 --compare-pytorch worker/bench/pytorch_dit.py --python "$PY" --preset "$PRESET" --random-weights \
  --device "$DEVICE" --precision bf16 --width "$SIZE" --height "$SIZE" --cap-len "$CAP" --uncond-len $((CAP / 2)) --iters 5 --warmup 2
if [ -n "$FAILED" ]; then
  echo "failed runs:$FAILED"
  exit 1
fi
