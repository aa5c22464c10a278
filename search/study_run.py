"""What ``python -m search.run`` does once its flags parse and its study file loads (``search.run`` is the
command line): validate storage, devices and data, create or resume the study, run its workers, report the
front.

Kept apart from ``search.run`` so that the command answers ``--help`` and a mistyped flag before torch is
imported, and a mistake in the study file before Lightning and torchmetrics are (several seconds each)."""


from __future__ import annotations

import argparse
import gc
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from lightning_modules.backbones import BACKBONES
from search import redact
from search.data import prepare_datamodule
from search.devices import Slot, pin_threads, plan_slots
from search.errors import UsageError
from search.objective import Devices, TrialRunner, trial_seed
from search.pareto import cost_ranges, front_table, hypervolume, pareto_front, reference_costs, study_cost_scale
from search.space import one_pixel_se_stages
from search.storage import STORAGE_ENV, masked, open_storage, resolve_storage_url, resolve_study_name, runs_dir
from search.study_config import StudyConfig
from search.study_store import (
    check_definition,
    create_or_load_study,
    default_study_name,
    flags_for_definition,
    load_existing_study,
    make_sampler_and_pruner,
)
from search.worker import FAIL_REASON_ATTR, THREADS_ATTR, WorkerSpec

__all__ = ["run"]




def _trial_line(t: FrozenTrial) -> str:
    a = t.user_attrs
    head = f"trial {t.number:>4} {t.state.name:<8}"
    if t.state == TrialState.FAIL:
        return f"{head} {a.get(FAIL_REASON_ATTR, 'no heartbeat: its worker died or was killed; retried if allowed')}"
    curve = a.get("val_accuracy_curve", [])
    acc = a.get("val_accuracy", curve[-1] if curve else float("nan"))
    test = f" test {a['test_accuracy']:.4f}" if "test_accuracy" in a else ""
    stages = " ".join(a.get("placements", []))
    return (
        f"{head} val {acc:.4f}{test}  {a.get('flops', 0) / 1e6:9.2f} MFLOPs  {a.get('params', 0):>10,} params  "
        f"{a.get('epochs_run', len(curve))} ep  {a.get('train_seconds', 0):.1f}s  [{stages}]"
    )


def _start_workers(slots: list[Slot], spec: WorkerSpec, log_dir: Path) -> list[tuple[subprocess.Popen, Path]]:
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, slot in enumerate(slots):
        worker_spec = WorkerSpec(**{**spec.__dict__, "accelerator": slot.accelerator, "devices": slot.devices,
                                    "threads": slot.threads, "worker_index": i})
        log = log_dir / f"worker-{i}.log"
        with log.open("ab") as fh:
            # The spec holds the storage URL: it goes through a pipe, never onto the visible command line.
            proc = subprocess.Popen(
                [sys.executable, "-m", "search.worker", "-"],
                env={**slot.env(), "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.PIPE,
                stdout=fh,
                stderr=subprocess.STDOUT,
                text=True,
            )
        assert proc.stdin is not None
        proc.stdin.write(worker_spec.to_json())
        proc.stdin.close()
        procs.append((proc, log))
    return procs


def _monitor(study: optuna.Study, procs: list[tuple[subprocess.Popen, Path]], trials: int, poll: float) -> None:
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    done = Counter(t.state for t in study.get_trials(deepcopy=False) if t.state.is_finished())
    bar = tqdm(
        total=trials,
        initial=done[TrialState.COMPLETE] + done[TrialState.PRUNED],
        unit="trial",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None,
    )
    best = None
    try:
        while True:
            alive = any(p.poll() is None for p, _ in procs)
            for t in study.get_trials(deepcopy=False):
                if t.state.is_finished() and t.number not in seen:
                    seen.add(t.number)
                    done[t.state] += 1
                    tqdm.write(_trial_line(t), file=sys.stdout)
                    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                        bar.update(1)
                    if t.state == TrialState.COMPLETE:
                        best = max(best or 0.0, t.values[0])
            bar.set_postfix(
                done=done[TrialState.COMPLETE],
                pruned=done[TrialState.PRUNED],
                failed=done[TrialState.FAIL],
                best=f"{best:.4f}" if best is not None else "-",
            )
            if not alive:
                return
            time.sleep(poll)
    finally:
        bar.close()


def _report_worker_failures(procs: list[tuple[subprocess.Popen, Path]]) -> int:
    bad = 0
    for i, (proc, log) in enumerate(procs):
        if proc.returncode not in (0, None):
            bad += 1
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            print(f"worker {i} exited with code {proc.returncode}; last lines of {log}:", file=sys.stderr)
            print("\n".join(f"  {line}" for line in tail), file=sys.stderr)
    return bad


def _stop_workers(
    procs: list[tuple[subprocess.Popen, Path]], sig: int = signal.SIGINT, timeout: float = 60.0, grace: float = 10.0
) -> None:
    """Pass the stop signal on (a terminal's Ctrl-C reached the workers already; a second one is ignored),
    give them ``timeout`` seconds to mark their trials, then make sure they are gone.

    A worker past its time (stuck in a native call, a DDP teardown, a locked database) has already taken
    its first signal, and its handler only notes a second one, so SIGTERM may not end it: after ``grace``
    more seconds it is killed. Its trial stays RUNNING and is failed and retried once its heartbeat is
    stale, as after any crash."""
    for proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    for i, (proc, _) in enumerate(procs):
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
            continue
        except subprocess.TimeoutExpired:
            proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"worker {i} did not stop within {timeout + grace:.0f} s; killed it (its running trial is "
                  "retried once its heartbeat is stale)", file=sys.stderr)
            proc.kill()
            proc.wait()


def _summary(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    print(f"\nstudy {study.study_name!r}: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())))
    front = pareto_front(study)
    label = "Pareto front (validation accuracy vs FLOPs)" if len(study.directions) > 1 else "best trial"
    print(f"{label}:\n{front_table(front)}")
    objectives = study.user_attrs.get("objectives", ["val_accuracy"])
    scale = study_cost_scale(study.user_attrs)
    if len(objectives) > 1 and scale:
        how = ("cost scaled over the search space's range, reference point (0, 1.1)" if "cost_ranges" in
               study.user_attrs else "cost / 2x plain backbone, reference point (0, 1)")
        print(f"hypervolume (accuracy x {how}): {hypervolume(trials, objectives, scale):.4f}")


def _warn_one_pixel_poolings(cfg: StudyConfig, shape: dict[str, int]) -> None:
    """Say so when the study searches squeeze poolings in stages where they barely differ (1x1 maps)."""
    if len(cfg.search_space.pooling) < 2:
        return
    stages = one_pixel_se_stages(cfg, **shape)
    if stages:
        print(f"warning: at image size {shape['image_size']}, the SE blocks of stage(s) "
              f"{', '.join(map(str, stages))} squeeze 1x1 feature maps, where the searched poolings barely differ "
              "(avg = max, gem ~ avg, std gives a constant gate): trials there differ in name more than in "
              "network; a larger data.image_size avoids it", file=sys.stderr, flush=True)


def _remedy(study: optuna.Study, args: argparse.Namespace, overrides: dict[str, object], prefix: str,
            otherwise: str) -> str:
    """What to do about ``study``'s other definition: add the flags it was run with, if some do."""
    flags = flags_for_definition(study, args.study, overrides)
    return f"{prefix}add the flags it was run with ({flags})" if flags else f"{prefix}{otherwise}"


def _rerun_slot(args: argparse.Namespace, stored: FrozenTrial) -> Slot:
    """Where a rerun trains: over as many DDP ranks as the trial did (one rank instead would train with a
    smaller global batch and more steps: another run), on the GPU(s) ``--gpus`` names, pinned in this
    process as a worker's are (CUDA is not initialised yet; the DDP helper ranks inherit it)."""
    world = int(stored.user_attrs.get("ddp_world_size", 1))
    gpu = plan_slots(args.gpus, 1, None)[0].accelerator == "gpu"
    try:
        slot = plan_slots(args.gpus, 1, None, gpus_per_trial=world) if gpu else plan_slots(
            None, 1, None, procs_per_trial=world)
    except UsageError:
        raise UsageError(f"--rerun-trial: trial {stored.number} trained with DDP over {world} GPUs; give --gpus "
                         f"with a multiple of {world} GPUs") from None
    if gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot[0].cuda_visible_devices or ""
    return slot[0]


def _rerun(args: argparse.Namespace, cfg: StudyConfig, storage: optuna.storages.BaseStorage, name: str,
           overrides: dict[str, object]) -> int:
    study = optuna.load_study(study_name=resolve_study_name(storage, name), storage=storage)
    # Retraining under another definition (the file changed, or the run's --dataset/--epochs were left off)
    # would compare the stored accuracy with a different experiment's.
    check_definition(study, cfg, lambda: _remedy(study, args, overrides, "--rerun-trial: ",
                                                 "restore the study file it was run with"))
    stored = next((t for t in study.get_trials(deepcopy=False) if t.number == args.rerun_trial), None)
    if stored is None:
        raise UsageError(f"--rerun-trial: study {study.study_name!r} has no trial {args.rerun_trial}")
    threads = stored.user_attrs.get(THREADS_ATTR)
    if threads:  # the trial's own count, whatever this shell's OMP_NUM_THREADS says (search.worker.THREADS_ATTR)
        pin_threads(int(threads))
    slot = _rerun_slot(args, stored)
    dm = prepare_datamodule(cfg)
    runner = TrialRunner(cfg, dm, Devices(slot.accelerator, slot.devices))
    try:
        design = runner.design(optuna.trial.FixedTrial(stored.params, stored.number))
        seed = stored.user_attrs.get("seed", trial_seed(cfg.seed, stored))
        result = runner.fit(design, seed, None)
    finally:
        runner.close()
    a = stored.user_attrs
    unit = "GPUs" if slot.accelerator == "gpu" else "processes"
    ranks = f", DDP over {slot.devices} {unit}" if slot.devices > 1 else ""
    print(f"trial {stored.number} ({stored.state.name}), seed {seed}, {torch.get_num_threads()} torch threads{ranks}:")
    # Six decimals: the point is to show that the rerun reproduces the stored accuracy exactly.
    print(f"  stored: val {a.get('val_accuracy', float('nan')):.6f}  test {a.get('test_accuracy', float('nan')):.6f}")
    print(f"  rerun:  val {result['val_accuracy']:.6f}  test {result['test_accuracy']:.6f}")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM: stop like Ctrl-C (the workers are sent SIGTERM in turn)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _resume_line(trials: list[optuna.trial.FrozenTrial]) -> str | None:
    states = Counter(t.state for t in trials)
    if not states:
        return None
    finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
    return (f"resuming: {finished} finished, {states[TrialState.RUNNING]} running (failed and retried once their "
            f"heartbeat is older than the grace period, if their worker is gone), {states[TrialState.WAITING]} "
            f"queued, {states[TrialState.FAIL]} failed")


def run(args: argparse.Namespace, cfg: StudyConfig, overrides: dict[str, object]) -> int:
    """Run the study of ``args`` (``search.run``'s flags): ``cfg`` is its file as ``search.run`` loaded it,
    with ``overrides`` (the flags that override the file; None where not given)."""
    redact.install(args.storage or os.environ.get(STORAGE_ENV))
    url = resolve_storage_url(args.storage, args.runs_dir)
    slots = plan_slots(args.gpus, args.trials_per_gpu, args.workers, gpus_per_trial=args.gpus_per_trial,
                       procs_per_trial=args.procs_per_trial)
    storage = open_storage(url, heartbeat_interval=args.heartbeat_interval or None, grace_period=args.grace_period)
    name = args.study_name or default_study_name(cfg, overrides)
    if args.rerun_trial is not None:
        return _rerun(args, cfg, storage, name, overrides)
    existing_study = load_existing_study(storage, name)
    if existing_study is not None:  # checked before the data is prepared (a first CIFAR cache takes minutes)
        # Under a name of its own, the flags the study was run with are the likely fix; under the default
        # name, flags would name another study, so only the file can have changed.
        check_definition(existing_study, cfg, lambda: _remedy(
            existing_study, args, overrides, "", "give another --study-name, or restore the study file"
        ) if args.study_name else "give another --study-name, or restore the study file")
    num_stages = BACKBONES.get(cfg.backbone)().num_stages
    make_sampler_and_pruner(cfg, num_stages)  # their settings too, before the data
    dm = prepare_datamodule(cfg)  # fails on missing data before the study is touched; fills the cache
    shape = {"num_classes": dm.num_classes, "in_channels": dm.in_channels, "image_size": dm.image_size}
    del dm
    gc.collect()
    _warn_one_pixel_poolings(cfg, shape)
    study = create_or_load_study(
        storage,
        name,
        cfg,
        num_stages,
        lambda: {"cost_ranges": cost_ranges(cfg, **shape), "reference_costs": reference_costs(cfg, **shape),
                 "data_shape": shape},
    )
    existing = study.get_trials(deepcopy=False)  # read once: the resume line and the workers' sampler seeds
    resume = _resume_line(existing)
    per_trial = f", {slots[0].devices} DDP processes per trial" if slots[0].devices > 1 else ""
    print(
        f"study {name!r} in {masked(url)}: {cfg.trials} trials, {len(slots)} worker(s) on "
        f"{', '.join(sorted({s.accelerator for s in slots}))}{per_trial}",
        flush=True,
    )
    if resume:
        print(resume, flush=True)
    spec = WorkerSpec(
        study=args.study,
        study_name=name,
        storage=url,
        trials=cfg.trials,
        overrides={k: v for k, v in overrides.items() if v is not None},
        heartbeat_interval=args.heartbeat_interval or None,
        grace_period=args.grace_period,
        trials_at_start=len(existing),
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    procs = _start_workers(slots, spec, runs_dir(args.runs_dir) / "logs" / name)
    try:
        _monitor(study, procs, cfg.trials, args.poll)
    except KeyboardInterrupt as e:
        # A second Ctrl-C, or a scheduler's repeated SIGTERM, must not cut the clean stop short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(
            "\ninterrupted: stopping workers (their running trials are marked failed); rerun the same command "
            "to resume",
            file=sys.stderr,
        )
        _stop_workers(procs, signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
        _summary(study)
        return 130
    _report_worker_failures(procs)
    _summary(study)
    # The study is what counts: a worker that died (its trial retried by another) is reported above, but
    # a study that holds its trials is a success.
    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if finished >= cfg.trials:
        return 0
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    stuck = (f"; {running} trial(s) still RUNNING hold the rest of the budget, and with heartbeats off "
             "(--heartbeat-interval 0) nothing fails and retries them: rerun with heartbeats on"
             if running and not args.heartbeat_interval else "; rerun the command to continue")
    print(f"error: the study holds {finished} of its {cfg.trials} finished trials{stuck}", file=sys.stderr)
    return 1
