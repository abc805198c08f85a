#!/usr/bin/env bash
# The results table in docs/estimators.md: a 784-300-300-40 MLP VAE (Bernoulli likelihood, dynamic
# binarization) trained 5 epochs on Fashion-MNIST (reused when RUN already holds a finished run), then
# `pyro-vae compare` on 64 test images: mc, analytic and stl at K=1, iwae at K=1, 5, 50, iwae-dreg at
# K=5, 50; 100 draws each; reference log p(x) by IWAE with k=1000.
# Usage: bash scripts/compare_fashion_mnist.sh [RUN] [extra compare flags, e.g. --device cuda]
set -euo pipefail
run=${1:-runs/fm-compare}
shift || true
if [ ! -f "$run/summary.json" ]; then
  time pyro-vae train --dataset fashion-mnist --epochs 5 --hidden 300 300 --z-dim 40 \
    --binarize dynamic --likelihood bernoulli --out "$run" --overwrite --quiet
fi
time pyro-vae compare "$run" --estimators mc:1 analytic:1 stl:1 iwae:1 iwae:5 iwae:50 iwae-dreg:5 \
  iwae-dreg:50 --repeats 100 --batch-size 64 --eval-k 1000 --seed 0 --quiet "$@"
