#!/usr/bin/env bash
# Side-by-side CPU timing of the tiny golden DiT forward pass: this crate (tch) vs PyTorch eager
# (worker/bench/pytorch_dit.py), same weights, same inputs, same thread count; prints both and the
# ratio, and the largest difference between the two outputs.
#
#   eval "$(cargo xtask env)" && worker/bench/compare_cpu.sh [LATENT_SIDE_PX] [ITERS]
#
# Default image 512x512 px -> 64x64 latent -> 1024 image tokens, batch of 2 rows (a 32-token
# caption and a 16-token one, UNCOND=32 for equal lengths), fp32, as many threads as cores.
set -eu
cd "$(dirname "$0")/../.."
PX=${1:-512}
ITERS=${2:-20}
PY=${PYTHON:-${FARM_TORCH_VENV:-/root/.cache/newbie-farm/torch-venv}/bin/python}
BIN=${BIN:-target/release/newbie-bench}
[ -x "$BIN" ] || BIN=target/debug/newbie-bench
THREADS=${THREADS:-$(nproc)}
"$BIN" --compare-pytorch worker/bench/pytorch_dit.py --python "$PY" --preset tiny \
  --weights worker/tests/fixtures/goldens/dit_weights.safetensors \
  --device cpu --precision fp32 --width "$PX" --height "$PX" --cap-len 32 --uncond-len "${UNCOND:-16}" \
  --iters "$ITERS" --warmup 3 --threads "$THREADS" ${JSON:+--json}
