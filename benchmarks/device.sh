#!/usr/bin/env bash
# Runs ON the GPU machine (device tool: carry .whl and .devdata; see benchmarks/README.md): installs the
# carried wheels, unpacks the data, runs GPU benchmarks inside a budget and leaves the results JSON in $OUT.
#
#   bash benchmarks/device.sh [BUDGET_SECONDS [BENCHMARK...]]     (default: 480 s, every GPU benchmark)
#
# whole_study, if named, runs last and gets whatever time the others left (its result then records the pace
# if it could not finish); everything else runs first in one process, results written after each, straight
# into $OUT.
#
# Environment: OUT (results; default /tmp/bench-out), BENCH_WORK (scratch for the wheels' install, the
# unpacked data and the decoded-data cache; default /tmp), DRY_RUN=1 (run the same steps with the
# benchmarks' --dry-run: on the CPU, at toy size; the test suite does this, tests/benchmarks/test_device.py).
set -uo pipefail
budget=${1:-480}
shift || true
names=("$@")
# Targets first, the informational ones after them (benchmarks.run keeps this order).
((${#names[@]})) || names=(trial_speed overhead_gpu full_devices recipe_sweep trial_profile whole_study)
out=${OUT:-/tmp/bench-out}
work=${BENCH_WORK:-/tmp}
dry=()
[[ ${DRY_RUN:-0} == 1 ]] && dry=(--dry-run)
mkdir -p "$out"
left() { echo $((budget - SECONDS)); }
bench() {  # bench SECONDS ARGS...: one benchmarks.run invocation, interrupted (results kept) after SECONDS
  local limit=$1
  shift
  timeout --signal=INT --kill-after=20 "$limit" python3 -m benchmarks.run --gpu "${dry[@]}" \
    --data-dir "$work/cifar10-jpeg" --results-dir "$out" "$@"
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
  .whl/*.whl || exit 1
export PYTHONPATH=$work/site:$PWD PYTHONUNBUFFERED=1 SE_SEARCH_CACHE_DIR=$work/se-cache
SE_SEARCH_COMMIT=${SE_SEARCH_COMMIT:-$(cat .devdata/commit 2>/dev/null)}
export SE_SEARCH_COMMIT
# The packed tree (../shared/tools/jpeg_tree_blob.py's format; ../shared does not travel): bytes + offsets.
python3 - "$work/cifar10-jpeg" <<'PY' || exit 1
import numpy as np, pathlib, sys
z = np.load(".devdata/cifar10-jpeg.npz"); data, off, paths = z["data"], z["offsets"], z["paths"]
for i, p in enumerate(paths):
    f = pathlib.Path(sys.argv[1]) / p.decode(); f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data[off[i]:off[i + 1]].tobytes())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || ((${#dry[@]})) || exit 1
python3 -c "import torch, pytorch_lightning, optuna; print('torch', torch.__version__, 'lightning',
pytorch_lightning.__version__, 'optuna', optuna.__version__)" || exit 1
echo "set-up done at ${SECONDS}s"

others=() study=0
for n in "${names[@]}"; do
  if [[ $n == whole_study ]]; then study=1; else others+=(--only "$n"); fi
done
if ((${#others[@]})); then
  # recipe_sweep starts no variant past a fifth of the budget, so trial_profile and whole_study still run.
  bench $(($(left) - 150 * study - 10)) "${others[@]}" --sweep-seconds $((budget / 5))
  echo "== ${others[*]} done at ${SECONDS}s"
fi
if ((study && $(left) > 90)); then
  bench $(($(left) - 10)) --only whole_study --study-seconds $(($(left) - 45))
fi
echo "done at ${SECONDS}s"
