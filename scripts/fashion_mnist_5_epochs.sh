#!/usr/bin/env bash
# The Fashion-MNIST number in README.md: 5 epochs of a 784-300-300-40 MLP VAE, Bernoulli likelihood,
# dynamic binarization, then log p(x) with k=1000 importance samples on all 10,000 test images.
# Usage: bash scripts/fashion_mnist_5_epochs.sh [OUT] [extra train flags, e.g. --device cuda]
set -euo pipefail
out=${1:-runs/fm5}
shift || true
time pyro-vae train --dataset fashion-mnist --epochs 5 --hidden 300 300 --z-dim 40 \
  --binarize dynamic --likelihood bernoulli --out "$out" --quiet "$@"
time pyro-vae evaluate "$out" --eval-k 1000
