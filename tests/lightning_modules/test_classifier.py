"""SEClassifier's evaluation (flip test-time augmentation, ``TrainingRecipe.tta``) and its one-cycle schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules import ConfigError, build_arch
from lightning_modules.classifier import SCHEDULES, TEST_ACCURACY, SEClassifier, TrainingRecipe, eval_logits
from lightning_modules.data import CACHE_DIR_ENV, DATA_DIR_ENV, DataConfig, build_datamodule


def test_eval_logits_adds_the_mirrored_images_with_flip() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))  # not mirror-symmetric
    x = torch.randn(6, 3, 4, 4)
    assert torch.equal(eval_logits(net, x, "none"), net(x))
    assert torch.allclose(eval_logits(net, x, "flip"), net(x) + net(torch.flip(x, dims=[3])))
    assert not torch.allclose(eval_logits(net, x, "flip"), 2 * net(x))


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
    with pytest.raises(ConfigError, match="tta: unknown value 'rotate'; allowed: none, flip"):
        TrainingRecipe(tta="rotate")


@pytest.mark.parametrize("tta", ["none", "flip"])
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
    other = "none" if tta == "flip" else "flip"
    with torch.no_grad():
        flipped = [(eval_logits(model, x, other).argmax(1), y) for x, y in dm.test_dataloader()]
    assert sum(int((p == y).sum()) for p, y in flipped) / sum(len(y) for _, y in flipped) != expected
