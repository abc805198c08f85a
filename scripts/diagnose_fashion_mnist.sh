#!/usr/bin/env bash
# The Fashion-MNIST table in docs/diagnostics.md: train a 784-300-300-40 MLP VAE for 5 epochs
# (Bernoulli likelihood, dynamic binarization; skipped when OUT already has a checkpoint), then
# `pyro-vae diagnose` on 100 test examples: k=2000 importance samples, 300 SVI steps per q*, and NUTS
# on 3 of the examples (2 chains x 1000 draws after 500 warm-up).
# OMP_NUM_THREADS=1: on a CPU shared with other jobs, torch's second thread mostly waits (SVI steps
# ran 5x slower with two threads than with one on our busy 2-core machine); drop it on an idle one.
# Usage: bash scripts/diagnose_fashion_mnist.sh [OUT] [extra diagnose flags, e.g. --device cuda]
set -euo pipefail
out=${1:-runs/fm-diagnose}
shift || true
if [ ! -f "$out/checkpoint.pt" ]; then
  time pyro-vae train --dataset fashion-mnist --hidden 300 300 --z-dim 40 --epochs 5 --out "$out" --quiet
fi
time OMP_NUM_THREADS=1 pyro-vae diagnose "$out" --n-examples 100 --eval-k 2000 --svi-steps 300 \
  --mcmc-examples 3 --num-samples 1000 --warmup 500 --quiet "$@"
