"""Study files: every shipped study validates; bad files fail with the file, key and allowed values."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import torch

from lightning_modules import ConfigError, build_arch
from lightning_modules.se import SEBlock
from search.errors import UsageError
from search.space import grid_search_space, one_pixel_se_stages, suggest
from search.study_config import STUDIES_DIR, StudyConfig, find_study_file, load_study
from search.study_store import create_or_load_study, flags_for_definition

SHIPPED = sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def test_shipped_studies_include_flagship_and_ablations() -> None:
    assert {"se_placement", "ablation_placement", "ablation_reduction", "ablation_pooling", "ablation_stages"} <= set(
        SHIPPED
    )


@pytest.mark.parametrize("name", SHIPPED)
def test_study_config_shipped_file_validates(name: str) -> None:
    cfg = load_study(name)
    assert cfg.name == name
    assert cfg.objectives[0] == "val_accuracy"


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return str(path)


BASE = """
backbone: resnet20
search_space: {placement: [none, standard]}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE + "colour: red\n", "unknown key 'colour'"),
        ("backbone: resnet99\nsearch_space: {}\n", "backbone: unknown value 'resnet99'; allowed: resnet20"),
        (
            "backbone: resnet20\nsearch_space: {placement: [sideways]}\n",
            "search_space.placement: unknown value 'sideways'; allowed: none, standard",
        ),
        (
            "backbone: resnet20\nsearch_space: {pooling: [median]}\n",
            "search_space.pooling: unknown value 'median'; allowed: avg, max",
        ),
        (
            "backbone: resnet20\nsearch_space: {reduction: [0]}\n",
            "search_space.reduction: choices must be integers >= 1",
        ),
        (BASE + "training: {epochs: 0}\n", "training.epochs: must be an integer >= 1"),
        (BASE + "training: {optimizer: lbfgs}\n", "training.optimizer: unknown value 'lbfgs'; allowed: sgd, adamw"),
        (BASE + "training: {epochs: ten}\n", "training.epochs: expected an integer"),
        (BASE + "objectives: [flops]\n", "objectives: the first objective must be val_accuracy"),
        (BASE + "objectives: [val_accuracy, speed]\n", "objectives: unknown value 'speed'"),
        (BASE + "data: {datset: cifar10}\n", "data: unknown key 'datset'"),
        ("backbone: [unclosed\n", "cannot parse the study file"),
        # Searched training values are checked against the recipe at load, not by every trial failing.
        (
            "backbone: resnet20\nsearch_space: {lr: {low: -0.5, high: -0.1}}\n",
            "search_space.lr: value -0.5 is out of range; give a finite number > 0",
        ),
        (
            "backbone: resnet20\nsearch_space: {weight_decay: {low: -1, high: 0}}\n",
            "search_space.weight_decay: value -1.0 is out of range; give a finite number >= 0",
        ),
        (
            "backbone: resnet20\nsearch_space: {label_smoothing: [0.0, 1.0]}\n",
            "search_space.label_smoothing: value 1.0 is out of range; give a finite number in [0, 1)",
        ),
        # NaN and infinity: every comparison with NaN is false, and Optuna cannot sample up to infinity.
        (
            "backbone: resnet20\nsearch_space: {lr: {low: 0.1, high: .inf}}\n",
            "search_space.lr.high: must be a finite number, got inf",
        ),
        (
            "backbone: resnet20\nsearch_space: {width_multiplier: [.nan, 1.0]}\n",
            "search_space.width_multiplier: choices must be finite numbers, got [nan, 1.0]",
        ),
        (
            "backbone: resnet20\nsearch_space: {width_multiplier: [.inf]}\n",
            "search_space.width_multiplier: choices must be finite numbers, got [inf]",
        ),
        (
            "backbone: resnet20\nsearch_space: {label_smoothing: [.nan]}\n",
            "search_space.label_smoothing: choices must be finite numbers, got [nan]",
        ),
        ("- just\n- a list\n", "a study file must be a mapping"),
    ],
)
def test_study_config_bad_file_names_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_study(path)
    message = str(info.value)
    assert path in message and expected in message
    assert "\n" not in message


@pytest.mark.parametrize("width", [float("nan"), float("inf"), -1.0])
def test_build_arch_refuses_a_width_multiplier_that_is_not_a_finite_positive_number(width: float) -> None:
    with pytest.raises(ConfigError, match="width_multiplier: must be a finite number > 0"):
        build_arch("resnet20", width_multiplier=width)


@pytest.mark.parametrize(
    ("pruner", "expected"),
    [
        ("{name: hyperband}", "pruner.name: 'hyperband' works for single-objective studies only"),
        ("{name: median, options: {no_such_option: 1}}", "pruner.options: "),
        ("{name: median, options: {n_startup_trials: -1}}", "pruner.options: "),
        ("{name: sometimes}", "pruner.name: unknown pruner 'sometimes'; allowed: none, median"),
    ],
)
def test_multi_objective_pruner_is_checked_before_the_study_is_stored(tmp_path: Path, pruner: str,
                                                                      expected: str) -> None:
    """Multi-objective studies prune in their workers; bad pruner settings must not store a study whose every
    worker then dies on them."""
    cfg = load_study(_write(tmp_path, BASE + f"objectives: [val_accuracy, flops]\npruner: {pruner}\n"))
    storage = optuna.storages.InMemoryStorage()
    with pytest.raises(UsageError, match=re.escape(expected)):
        create_or_load_study(storage, "mo", cfg, 3)
    assert storage.get_all_studies() == []


def test_study_config_unknown_study_lists_known_ones() -> None:
    with pytest.raises(UsageError, match=r"unknown study 'nope'.*se_placement"):
        load_study("nope")


def test_study_config_overrides_change_identity_but_not_location() -> None:
    base = load_study("se_placement")
    assert load_study("se_placement", dataset="digits").definition_hash() != base.definition_hash()
    assert load_study("se_placement", epochs=3).definition_hash() != base.definition_hash()
    assert load_study("se_placement", data_dir="/elsewhere", trials=3).definition_hash() == base.definition_hash()


@pytest.mark.parametrize(("section", "anchor", "key", "default", "other"), [
    ("training", "warmup_fraction: 0.2", "tta", "none", "flip"),
    ("training", "warmup_fraction: 0.2", "freeze_bn_scale", "false", "true"),
    ("training", "warmup_fraction: 0.2", "bn_bias_lr_scale", "1.0", "64"),
    ("data", "split_seed: 0", "flip", "random", "alternate"),
])
def test_study_identity_counts_later_keys_only_off_their_default(tmp_path: Path, section: str, anchor: str, key: str,
                                                                 default: str, other: str) -> None:
    """Keys that came after studies were stored: at their default they are not part of the identity (an older
    study keeps its hash and resumes), stated or not; any other value is."""
    text = "".join(line for line in find_study_file("se_placement").read_text().splitlines(keepends=True)
                   if not line.lstrip().startswith(f"{key}:"))
    anchor = f"  {anchor}\n"
    assert text.count(anchor) == 1
    study = tmp_path / "se_placement.yaml"

    def with_key(value: str | None) -> StudyConfig:
        study.write_text(text.replace(anchor, anchor + (f"  {key}: {value}\n" if value is not None else "")))
        return load_study(str(study))

    base = with_key(None)
    assert key not in base.identity()[section]
    assert str(getattr(getattr(with_key(default), section), key)).lower() == default.lower()
    assert with_key(default).definition_hash() == base.definition_hash()
    assert str(with_key(other).identity()[section][key]).lower() in {other, f"{other}.0"}
    assert with_key(other).definition_hash() != base.definition_hash()


def test_space_none_stage_suggests_no_ratio_or_pooling() -> None:
    cfg = load_study("se_placement")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen_none = False
    for _ in range(40):
        trial = study.ask()
        design = suggest(trial, cfg, num_classes=10, in_channels=3, image_size=32)
        for i, placement in enumerate(design.arch.placements, start=1):
            assert trial.params[f"stage{i}.placement"] == placement
            has_ratio = f"stage{i}.reduction" in trial.params and f"stage{i}.pooling" in trial.params
            assert has_ratio == (placement != "none")
            seen_none |= placement == "none"
            if placement != "none":
                assert design.arch.reductions[i - 1] == trial.params[f"stage{i}.reduction"]
        study.tell(trial, [0.5, 1.0])
    assert seen_none


def test_space_grid_covers_the_paper_tables() -> None:
    assert grid_search_space(load_study("ablation_placement"), 3) == {
        "placement": ["none", "standard", "pre", "post", "identity"]
    }
    assert grid_search_space(load_study("ablation_reduction"), 3) == {"reduction": [2, 4, 8, 16, 32]}
    stages = grid_search_space(load_study("ablation_stages"), 3)
    assert stages == {f"stage{i}.placement": ["none", "standard"] for i in (1, 2, 3)}


def test_study_config_dataset_profile_applies_only_to_its_dataset() -> None:
    cifar = load_study("se_placement")
    digits = load_study("se_placement", dataset="digits", epochs=2)
    assert cifar.training.batch_size == 512 and cifar.data.image_size is None
    assert digits.training.batch_size == 64 and digits.data.image_size == 8
    assert digits.training.epochs == 2  # the command line still wins over the profile
    assert digits.training.momentum == cifar.training.momentum  # untouched keys are kept


def test_study_config_bad_dataset_profile_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "by_dataset: [digits]\n")
    with pytest.raises(UsageError, match="by_dataset: expected a mapping"):
        load_study(path)
    path = _write(tmp_path, BASE + "data: {dataset: digits}\nby_dataset: {digits: {training: {epochz: 1}}}\n")
    with pytest.raises(UsageError, match="training: unknown key 'epochz'"):
        load_study(path)


def test_study_config_scientific_notation_is_a_number(tmp_path: Path) -> None:
    cfg = load_study(_write(tmp_path, BASE + "training: {lr: 1e-3, weight_decay: 5E-4}\n"))
    assert cfg.training.lr == 1e-3 and cfg.training.weight_decay == 5e-4


@pytest.mark.parametrize("flip", ["random", "alternate"])
def test_study_data_flip_reaches_the_training_loader(tmp_path: Path, flip: str) -> None:
    """``data.flip`` in a study file is what the trial's training loader does, and what the data module
    says it does (the description stored with each trial)."""
    from search.data import prepare_datamodule
    from tests.lightning_modules.test_data import _write_tree

    tree = _write_tree(tmp_path / "tree", n_train=30)
    study = tmp_path / "flips.yaml"
    study.write_text(f"backbone: resnet20\ndata: {{dataset: imagefolder, flip: {flip}}}\nsearch_space: {{}}\n"
                     "training: {batch_size: 16}\n")
    dm = prepare_datamodule(load_study(str(study), data_dir=str(tree)))
    assert dm.train_dataloader().flip == flip
    assert dm.describe()["augment"]["horizontal_flip"] == flip


@pytest.mark.parametrize(("run_with", "expected"), [
    ({"dataset": "digits"}, "--dataset digits"),  # the digits profile's 10 epochs need no --epochs
    ({"dataset": "digits", "epochs": 3, "seed": 7}, "--dataset digits --epochs 3 --seed 7"),
    ({"seed": 5}, "--seed 5"),
])
def test_flags_for_definition_names_the_fewest_flags_the_study_was_run_with(run_with: dict, expected: str) -> None:
    """What ``--rerun-trial`` and a run under ``--study-name`` suggest when the definitions differ: read from
    the stored definition (not the study's name), and only the flags the file does not already give."""
    study = create_or_load_study(optuna.storages.InMemoryStorage(), "mine", load_study("se_placement", **run_with), 4)
    assert flags_for_definition(study, "se_placement", {}) == expected
    assert flags_for_definition(study, "se_placement", run_with) is None  # given them all, nothing to add
    if len(run_with) == 3:  # given some, only the rest are named
        assert flags_for_definition(study, "se_placement", {"seed": 7}) == "--dataset digits --epochs 3"


def test_flags_for_definition_none_when_the_file_itself_changed(tmp_path: Path) -> None:
    study = create_or_load_study(optuna.storages.InMemoryStorage(), "mine", load_study("se_placement", epochs=3), 4)
    edited = tmp_path / "se_placement.yaml"
    edited.write_text(find_study_file("se_placement").read_text().replace("trials: 100", "trials: 7"))
    assert flags_for_definition(study, str(edited), {}) == "--epochs 3"  # the trial count is not the definition
    edited.write_text(find_study_file("se_placement").read_text().replace("reduction: [", "reduction: [2, "))
    assert flags_for_definition(study, str(edited), {}) is None


def test_one_pixel_se_stages_are_where_poolings_are_one_network() -> None:
    """fastnet_whiten's stage 3 squeezes 1x1 maps on 8x8 digits (not on 32x32 CIFAR), and there ``avg`` and
    ``max`` give the same block: the reason ``search.run`` warns about searching poolings there."""
    digits = load_study("se_placement", dataset="digits")
    assert one_pixel_se_stages(digits, num_classes=10, in_channels=1, image_size=8) == [3]
    assert one_pixel_se_stages(load_study("se_placement"), num_classes=10, in_channels=3, image_size=32) == []
    assert one_pixel_se_stages(load_study("ablation_pooling"), num_classes=10, in_channels=1, image_size=8) == []
    torch.manual_seed(0)
    avg, peak = SEBlock(64, 4, "avg"), SEBlock(64, 4, "max")
    peak.load_state_dict(avg.state_dict())
    z = torch.randn(2, 64, 1, 1)
    assert torch.equal(avg(z), peak(z))
    z = torch.randn(2, 64, 2, 2)
    assert not torch.allclose(avg(z), peak(z))
