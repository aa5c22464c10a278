#!/usr/bin/env bash
# Run HERE (the development machine) before a device run: fetches the wheels the GPU machine lacks into
# .whl/ and packs the CIFAR-10 JPEG copy into one file in .devdata/ (the upload limit counts files).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.devdata/' .git/info/exclude 2>/dev/null || echo /.devdata/ >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# The GPU image already has numpy, pyyaml, tqdm, markupsafe, typing-extensions (device KINDS.md).
for pkg in optuna sqlalchemy alembic colorlog mako; do
  version=$(.venv/bin/python -c "from importlib.metadata import version; print(version('$pkg'))")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$pkg==$version"
done
[ -f .devdata/cifar10-jpeg.npz ] || python3 ../shared/tools/jpeg_tree_blob.py pack ../shared/data/cifar10-jpeg .devdata/cifar10-jpeg.npz
# The tree sent to the GPU machine has no git history: record which commit it is (rerun after committing), with
# +dirty when uncommitted changes travel with it, as results measured here are labelled (git_revision).
.venv/bin/python -c "from search.study_store import git_revision; print(git_revision(short=True))" > .devdata/commit
du -sh .whl .devdata
# The device tool carries at most 64 MiB: the tracked and untracked-not-ignored files plus .whl and .devdata.
# Say so here, not as a refused upload on a lent machine's clock.
tree=$( (git ls-files -z --cached --others --exclude-standard; find .whl .devdata -type f -print0) \
  | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
echo "upload: $((tree / 1048576)) MiB of the device tool's 64"
if ((tree > 64 * 1048576)); then
  echo "error: the upload would be $((tree / 1048576)) MiB, over the device tool's 64 MiB; remove large untracked files" >&2
  exit 1
fi
