#!/usr/bin/env bash
# Every GPU claim of pyro-vae, measured in one call on a machine with a CUDA GPU (about 5 minutes on
# an H200). Writes logs and JSON into OUT and packs them (without checkpoints) into OUT/gpu_check.tar.gz.
#
#   bash scripts/gpu_check.sh OUT [DATA_DIR]
#
# DATA_DIR holds fashion-mnist/ (IDX .gz files; default: .data, as ../shared/gpu-wheels.sh leaves it;
# /usr/share/datasets/fashion-mnist is used where the Debian package is installed). Where Pyro is
# missing and .whl/ holds wheels, they are installed into /tmp/site first (the project's GPU machine
# has torch but not Pyro). Steps, each under its own time limit, each logged to OUT/<step>.log:
#   1. tests marked `cuda` (skipped on CPU machines);
#   2. scripts/bench.py on the GPU: batch 128, 784-400-20, mc and analytic: the plain-PyTorch
#      reference eager and compiled, pyro-vae eager and as a CUDA graph, peak memory, one epoch per
#      row, and IWAE log p(x) with k=5000 over the 10,000 test images;
#   3. scripts/bench.py against Pyro's own VAE example (784-400-50, batch 256);
#   4. pyro-vae train on Fashion-MNIST for 3 epochs, eager and with --cuda-graph on, and their loss
#      curves side by side (OUT/curves.json).
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT [DATA_DIR]}
data=${2:-.data}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

if ! $py -c "import pyro" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

status=0
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/steps.txt"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$out/steps.txt"
    tail -n 25 "$out/$name.log"
    [ $rc -eq 0 ] || status=1
}

{ nvidia-smi -L; $py -c "import torch, pyro, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'pyro', pyro.__version__, torch.cuda.get_device_name())"; } > "$out/device.txt" 2>&1
cat "$out/device.txt"

step tests 150 $py -m pytest -m "cuda and not slow" -p no:cacheprovider -q -rs tests
step bench 240 $py scripts/bench.py --device cuda --data-dir "$data" --batch-size 128 --estimator mc analytic \
    --epoch --eval-k 5000 --json "$out/bench-cuda.json"
step bench_example 150 $py scripts/bench.py --device cuda --data-dir "$data" --batch-size 256 --hidden 400 \
    --z-dim 50 --estimator mc --pyro-example --repeats 10 --json "$out/bench-example.json"
for graph in off on; do
    step "train_graph_$graph" 150 $py -m pyro_vae train --dataset fashion-mnist --data-dir "$data" --epochs 3 \
        --device cuda --cuda-graph "$graph" --eval-k 100 --quiet --out "$out/run-graph-$graph"
done
$py - "$out" <<'EOF' | tee "$out/curves.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
curves = {}
for graph in ("off", "on"):
    path = out / f"run-graph-{graph}" / "metrics.jsonl"
    if path.is_file():
        curves[graph] = [json.loads(line) for line in path.read_text().splitlines()]
(out / "curves.json").write_text(json.dumps(curves, indent=1))
for graph, rows in curves.items():
    print(f"cuda-graph {graph}: " + "; ".join(
        f"epoch {r['epoch']} train {r['train_loss']:.2f} test ELBO {r['test_elbo']:.2f} ({r['seconds']:.2f} s)"
        for r in rows))
EOF
tar -czf "$out/gpu_check.tar.gz" -C "$out" --exclude '*.pt' --exclude '*.tar.gz' . 2>/dev/null
exit $status
