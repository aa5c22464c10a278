"""The GPU machine's script, ``benchmarks/device.sh``, run here end to end in its dry-run mode: a GPU machine
is lent for minutes, so its script and every GPU benchmark are exercised before one is.

What runs is what runs there: the carried wheels are installed (a small wheel built here, offline), the
data is unpacked from a file packed by ``../shared/tools/jpeg_tree_blob.py`` (as ``prepare_device.sh``
packs it), and each GPU benchmark's code trains real networks through the platform and the hand loop, only
on the CPU, on 80 CIFAR-10 images, for one epoch (``benchmarks.gpu.DRY``)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks.gpu import RECIPE_VARIANTS, TEN_EPOCH_FLAGSHIP, WHITEN_FLAGSHIP
from tests.conftest import REPO, SHARED_CIFAR, small_cifar

pytestmark = pytest.mark.slow  # one dry run of the device script: minutes on a 2-core machine

TOOL = REPO.parent / "shared" / "tools" / "jpeg_tree_blob.py"
GPU_BENCHMARKS = ["trial_speed", "overhead_gpu", "trial_profile", "recipe_sweep", "full_devices", "whole_study"]


def _probe_wheel(directory: Path) -> None:
    """A minimal valid wheel (no build tools, no network) standing in for the carried optuna & co."""
    directory.mkdir()
    info = "se_device_probe-1.0.dist-info"
    files = {
        "se_device_probe/__init__.py": "CARRIED = True\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: se-device-probe\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(directory / "se_device_probe-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in {**files, f"{info}/RECORD": record}.items():
            wheel.writestr(name, text)


@pytest.fixture(scope="module")
def device_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """device.sh run once in a tree laid out as the device tool delivers it (the project's code, ``.whl``
    and ``.devdata``), with every GPU benchmark, in dry-run mode."""
    base = tmp_path_factory.mktemp("device")
    tree, work, out = base / "tree", base / "work", base / "out"
    tree.mkdir()
    for part in ("benchmarks", "lightning_modules", "search", "studies"):
        (tree / part).symlink_to(REPO / part)
    _probe_wheel(tree / ".whl")
    small_cifar(base / "cifar", train_per_class=6, test_per_class=2)  # 60 to train on, 20 to test
    (tree / ".devdata").mkdir()
    subprocess.run([sys.executable, str(TOOL), "pack", str(base / "cifar"), str(tree / ".devdata/cifar10-jpeg.npz")],
                   check=True, capture_output=True)
    (tree / ".devdata/commit").write_text("c0ffee1\n")
    # GIT_DIR: the device's copy has no git history, so its results take the commit prepare_device.sh recorded;
    # here the symlinked code would find this checkout's git (and git wins where it works).
    env = {**os.environ, "OUT": str(out), "BENCH_WORK": str(work), "DRY_RUN": "1", "GIT_DIR": str(base / "no-git"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SE_SEARCH_COMMIT", None)
    # A budget no dry run needs (recipe_sweep gets a fifth of it), so a slow CI machine cuts nothing short.
    proc = subprocess.run(["bash", str(REPO / "benchmarks/device.sh"), "900", *GPU_BENCHMARKS], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=1200)
    return proc, work, out


def test_device_script_installs_the_wheels_and_unpacks_the_data(device_run) -> None:
    proc, work, _ = device_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "site/se_device_probe/__init__.py").read_text() == "CARRIED = True\n"
    unpacked = sorted(p.relative_to(work / "cifar10-jpeg") for p in (work / "cifar10-jpeg").rglob("*.jpg"))
    assert len(unpacked) == 10 * (6 + 2)
    original = SHARED_CIFAR / unpacked[0]
    assert (work / "cifar10-jpeg" / unpacked[0]).read_bytes() == original.read_bytes()


def test_every_gpu_benchmark_runs_in_the_dry_run_and_lands_in_out(device_run) -> None:
    proc, _, out = device_run
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert runs, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(run["dry_run"] and run["commit"] == "c0ffee1" for run in runs)
    results = {r["name"]: r for run in runs for r in run["results"]}
    assert sorted(results) == sorted(GPU_BENCHMARKS), proc.stdout[-3000:]
    broken = {name: r["summary"] for name, r in results.items()
              if r["summary"].startswith("error:") or r["summary"] == "stopped before it finished"}
    assert not broken, proc.stdout[-3000:]
    # Each benchmark measured something real: trained networks, finished trials.
    speed = results["trial_speed"]
    assert 0 <= speed["test_accuracy"] <= 1 and speed["seconds"] > 0
    # trial_speed shares overhead_gpu's runs but keeps its own target and verdict (accuracy >= 0.9 fails here).
    assert (speed["target"], speed["met"]) == (">= 90% test accuracy in <= 10 s", False)
    assert speed["summary"].endswith("images/s") and results["overhead_gpu"]["target"] == "ratio <= 1.05"
    overhead = results["overhead_gpu"]
    assert overhead["ratio"] == statistics.median(overhead["pair_ratios"])
    assert len(overhead["pair_ratios"]) == len(overhead["hand_seconds"]) == len(overhead["platform_seconds"])
    sweep = results["recipe_sweep"]["variants"]
    assert [row["change"] for row in sweep] == RECIPE_VARIANTS
    # The dry run's one epoch and batch cap make the epoch variants the study recipe: trained once, not again.
    ten = sweep[RECIPE_VARIANTS.index(TEN_EPOCH_FLAGSHIP)]
    assert ten["same_run_as"] == {} and ten["test_accuracy"] == sweep[0]["test_accuracy"]
    assert sum("same_run_as" not in row for row in sweep) < len(RECIPE_VARIANTS)
    # Six-view TTA and random training flips (a data module of their own) are runs of their own.
    assert "same_run_as" not in sweep[RECIPE_VARIANTS.index({"tta": "flip_translate"})]
    random_flips = sweep[RECIPE_VARIANTS.index({"flip": "random"})]
    assert "same_run_as" not in random_flips
    # ... and the previous flagship (random flips, 10 epochs) is that run again once the dry run cuts both to one.
    assert sweep[RECIPE_VARIANTS.index(WHITEN_FLAGSHIP)]["same_run_as"] == {"flip": "random"}
    assert set(results["full_devices"]["trials_per_hour"]) == {"1", "2"}  # the dry run's K (gpu.DRY)
    assert results["full_devices"]["target"] == ">= 2x with K=2, results within seed noise"
    assert results["whole_study"]["finished"] == 2
    assert "with --workers 2," in results["whole_study"]["summary"]  # capped at the dry run's two CPU workers
    assert results["trial_profile"]["split"]["standard"]["epochs"]


def test_recipe_sweep_starts_no_variant_past_its_seconds(device_run) -> None:
    """On a short lease the sweep keeps what it measured and leaves the time to the benchmarks after it: past
    ``--sweep-seconds`` only the study's own recipe has run."""
    import argparse

    from benchmarks import gpu

    _, work, _ = device_run
    args = argparse.Namespace(dry_run=True, data_dir=str(work / "cifar10-jpeg"), sweep_seconds=0.0)
    result = gpu.recipe_sweep(args)
    assert [row["change"] for row in result["variants"]] == [{}]
    assert result["not_run"] == RECIPE_VARIANTS[1:]
    assert result["summary"].endswith(f"; {len(RECIPE_VARIANTS) - 1} variants not run (--sweep-seconds 0)")
