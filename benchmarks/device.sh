#!/usr/bin/env bash
# Runs ON the GPU machine (device tool: carry .whl and .devdata): installs the carried wheels, unpacks the
# data, runs the GPU benchmarks within ~8 minutes and leaves the results JSON in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SE_SEARCH_CACHE_DIR=/tmp/se-cache
python3 ../shared/tools/jpeg_tree_blob.py unpack .devdata/cifar10-jpeg.npz /tmp/cifar10-jpeg 2>/dev/null \
  || python3 - <<'PY'
import numpy as np, pathlib
z = np.load(".devdata/cifar10-jpeg.npz"); data, off, paths = z["data"], z["offsets"], z["paths"]
for i, p in enumerate(paths):
    f = pathlib.Path("/tmp/cifar10-jpeg") / p.decode(); f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data[off[i]:off[i + 1]].tobytes())
PY
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 470 python3 -m benchmarks.run --gpu --only trial_speed --only overhead_gpu --only full_devices \
  --data-dir /tmp/cifar10-jpeg --repeats 1
cp benchmarks/results/*.json "${OUT:-/tmp}/" 2>/dev/null
cp benchmarks/README.md "${OUT:-/tmp}/benchmarks-README.md" 2>/dev/null
