"""SEClassifier's evaluation (flip and translate test-time augmentation, ``TrainingRecipe.tta``), its one-cycle
schedule and its parameter groups (frozen BN scales, BN biases at a multiple of the learning rate)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules import ConfigError, build_arch
from lightning_modules.classifier import (
    OPTIMIZERS,
    SCHEDULES,
    TEST_ACCURACY,
    SEClassifier,
    TrainingRecipe,
    build_trainable,
    eval_logits,
)
from lightning_modules.data import CACHE_DIR_ENV, DATA_DIR_ENV, DataConfig, build_datamodule


def test_eval_logits_adds_the_mirrored_images_with_flip() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))  # not mirror-symmetric
    x = torch.randn(6, 3, 4, 4)
    assert torch.equal(eval_logits(net, x, "none"), net(x))
    assert torch.allclose(eval_logits(net, x, "flip"), net(x) + net(torch.flip(x, dims=[3])))
    assert not torch.allclose(eval_logits(net, x, "flip"), 2 * net(x))


def test_eval_logits_flip_translate_weighs_airbench_six_views() -> None:
    """Half the flip logits of the images, a quarter each of those shifted one pixel up-left and down-right
    with reflected edges (written out by hand here, pixel by pixel, not with ``F.pad``)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 4, 7))  # not shift-invariant
    x = torch.randn(6, 3, 5, 4)
    up_left = torch.empty_like(x)  # the view's pixel (i, j) is the image's (i - 1, j - 1), reflected at 0
    down_right = torch.empty_like(x)  # (i + 1, j + 1), reflected at the last row and column
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            up_left[..., i, j] = x[..., abs(i - 1), abs(j - 1)]
            down_right[..., i, j] = x[..., (h - 1) - abs(h - 2 - i), (w - 1) - abs(w - 2 - j)]
    flip = lambda v: net(v) + net(v.flip(-1))  # noqa: E731
    expected = 0.5 * flip(x) + 0.25 * flip(up_left) + 0.25 * flip(down_right)
    assert torch.allclose(eval_logits(net, x, "flip_translate"), expected, atol=1e-6)
    assert not torch.allclose(eval_logits(net, x, "flip_translate"), eval_logits(net, x, "flip"), atol=1e-3)


@pytest.mark.parametrize("steps", range(1, 13))
@pytest.mark.parametrize("warmup", [0.1, 0.2, 0.5])
def test_one_cycle_runs_every_step_of_short_runs(steps: int, warmup: float) -> None:
    """Short runs (a small split for one epoch) put warm-up boundaries on single steps: 0.2 of 5 steps once
    raised ZeroDivisionError inside torch's OneCycleLR."""
    recipe = TrainingRecipe(lr=0.4, warmup_fraction=warmup)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    schedule = SCHEDULES.get("onecycle")(opt, recipe, steps)
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(steps - 1):
        opt.step()
        schedule.step()
        rates.append(opt.param_groups[0]["lr"])
    assert len(rates) == steps and max(rates) <= recipe.lr + 1e-12
    if steps >= 3:  # the last step trains at a small fraction of the peak, the peak is reached
        assert rates[-1] < 0.1 * recipe.lr and max(rates) > 0.5 * recipe.lr


def test_recipe_refuses_unknown_tta() -> None:
    with pytest.raises(ConfigError, match="tta: unknown value 'rotate'; allowed: none, flip, flip_translate"):
        TrainingRecipe(tta="rotate")


@pytest.mark.parametrize("tta", ["none", "flip", "flip_translate"])
def test_lightning_test_accuracy_uses_the_recipes_tta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     tta: str) -> None:
    """The accuracy Lightning reports on test is the one of ``eval_logits`` with the recipe's mode."""
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    dm = build_datamodule(DataConfig(name="digits", batch_size=64, num_workers=0))
    dm.setup()
    arch = build_arch("resnet20", placement="standard", num_classes=dm.num_classes, in_channels=dm.in_channels,
                      image_size=dm.image_size, width_multiplier=0.25)
    pl.seed_everything(0, verbose=False)
    model = SEClassifier(arch, TrainingRecipe(epochs=1, batch_size=64, lr=0.05, tta=tta))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    reported = trainer.test(model, datamodule=dm, verbose=False)[0][TEST_ACCURACY]
    model.eval()
    with torch.no_grad():
        pairs = [(eval_logits(model, x, tta).argmax(1), y) for x, y in dm.test_dataloader()]
    expected = sum(int((p == y).sum()) for p, y in pairs) / sum(len(y) for _, y in pairs)
    assert reported == pytest.approx(expected, abs=1e-6)
    other = "none" if tta != "none" else "flip"
    with torch.no_grad():
        flipped = [(eval_logits(model, x, other).argmax(1), y) for x, y in dm.test_dataloader()]
    assert sum(int((p == y).sum()) for p, y in flipped) / sum(len(y) for _, y in flipped) != expected


def _groups(recipe: TrainingRecipe) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    net = build_trainable(build_arch("fastnet_page", placement="standard", width_multiplier=0.125), recipe)
    return net, OPTIMIZERS.get(recipe.optimizer)(net, recipe)


def test_default_recipe_keeps_the_two_parameter_groups() -> None:
    """Decayed weights and everything else at the one learning rate: the layout optimiser states saved by
    earlier versions have, so they still load."""
    net, opt = _groups(TrainingRecipe(lr=0.4))
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in opt.param_groups] == [
        (sum(p.ndim > 1 for p in net.parameters()), 5e-4, 0.4),
        (sum(p.ndim <= 1 for p in net.parameters()), 0.0, 0.4),
    ]


def test_bn_bias_lr_scale_trains_the_bn_biases_faster_through_the_schedule() -> None:
    recipe = TrainingRecipe(lr=0.4, bn_bias_lr_scale=64)
    net, opt = _groups(recipe)
    bn_biases = {id(m.bias) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    fast = [g for g in opt.param_groups if {id(p) for p in g["params"]} == bn_biases]
    assert len(fast) == 1 and fast[0]["weight_decay"] == 0.0
    schedule = SCHEDULES.get("onecycle")(opt, recipe, 20)
    for _ in range(19):
        rates = [g["lr"] for g in opt.param_groups]
        assert rates[-1] == pytest.approx(64 * rates[0]) and rates[0] == pytest.approx(rates[1])
        opt.step()
        schedule.step()
    assert max(g["max_lr"] for g in opt.param_groups) == pytest.approx(64 * 0.4)


def test_freeze_bn_scale_keeps_bn_scales_at_one_while_the_rest_trains() -> None:
    recipe = TrainingRecipe(lr=0.4, freeze_bn_scale=True)
    net, opt = _groups(recipe)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert bns and all(not m.weight.requires_grad and id(m.weight) not in in_optimizer for m in bns)
    torch.manual_seed(0)
    loss = torch.nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.arange(8))
    loss.backward()
    opt.step()
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)
    assert any(not torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bns)


@pytest.mark.parametrize(("change", "message"), [
    ({"bn_bias_lr_scale": 0}, "bn_bias_lr_scale: value 0 is out of range"),
    ({"bn_bias_lr_scale": float("nan")}, "bn_bias_lr_scale: value nan is out of range"),
    ({"freeze_bn_scale": "yes"}, "freeze_bn_scale: must be true or false, got 'yes'"),
])
def test_recipe_refuses_bad_bn_settings(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainingRecipe(**change)
