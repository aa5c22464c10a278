"""Backbones and architecture configs: every registered backbone x placement x pooling builds and trains a
step; presets match their published shapes; invalid configs fail naming the field and the allowed values."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from lightning_modules import (
    BACKBONES,
    PLACEMENTS,
    POOLINGS,
    ArchConfig,
    ConfigError,
    ResidualUnit,
    SEBlock,
    build_arch,
    build_network,
)
from lightning_modules.units import BRANCHES

IMAGENET_PRESETS = tuple(n for n in BACKBONES.names() if BACKBONES.get(n)().stem == "imagenet")
WIDE_PRESETS = tuple(n for n in BACKBONES.names() if max(BACKBONES.get(n)().widths) > 64)


# One torch thread: the spinning OpenMP workers made this grid ~15x slower on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small_config(backbone: str, placement: str, pooling: str) -> ArchConfig:
    """The preset at a small input (32 for CIFAR stems, 64 for ImageNet ones); the presets wider than 64
    channels (ImageNet ResNets, CIFAR ResNet-18, fastnet) at a quarter of their width.

    Depths, strides, stems, blocks, shortcuts and transitions stay the preset's, so every unit type and
    placement is exercised; only channel counts shrink. At full width the ImageNet presets alone take ~100 s
    on 2 CPU cores (ResNet-101 ~1 s a case); this way the whole grid takes ~35 s of CPU. The full-width
    networks are built on the meta device and checked against published counts in tests/search/test_cost.py.
    """
    return build_arch(
        backbone,
        placement=placement,
        reduction=4,
        pooling=pooling,
        image_size=64 if backbone in IMAGENET_PRESETS else 32,
        num_classes=7,
        width_multiplier=0.25 if backbone in WIDE_PRESETS else 1.0,
    )


@pytest.mark.parametrize(
    ("backbone", "placement", "pooling"),
    list(itertools.product(BACKBONES.names(), PLACEMENTS.names(), POOLINGS.names())),
)
def test_backbone_every_placement_and_pooling_trains_a_step(
    backbone: str, placement: str, pooling: str
) -> None:
    torch.manual_seed(0)
    cfg = _small_config(backbone, placement, pooling)
    net = build_network(cfg).train()
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    out = net(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 3])).backward()
    frozen = [name for name, p in net.named_parameters() if not p.requires_grad]
    assert frozen == (["stem.0.weight"] if cfg.stem == "whiten" else [])  # only the whitening filters
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    se_blocks = [m for m in net.modules() if isinstance(m, SEBlock)]
    units = [m for m in net.modules() if isinstance(m, ResidualUnit)]
    assert len(se_blocks) == (0 if placement == "none" else len(units))
    assert all(type(b.pool) is POOLINGS.get(pooling) for b in se_blocks)


def _shapes(net: nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in net.parameters())


@pytest.mark.parametrize(("ours", "theirs"), [("resnet50", "resnet50"), ("resnet101", "resnet101")])
def test_backbone_imagenet_preset_has_torchvision_parameter_shapes(ours: str, theirs: str) -> None:
    with torch.device("meta"):
        mine = build_network(build_arch(ours))
        reference = getattr(torchvision.models, theirs)()
    assert _shapes(mine) == _shapes(reference)


@pytest.mark.parametrize(
    ("backbone", "millions"),
    [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7)],
)
def test_backbone_cifar_resnet_matches_he_et_al_parameter_count(backbone: str, millions: float) -> None:
    """He et al. 2016, Table 6 (option-A shortcuts)."""
    with torch.device("meta"):
        net = build_network(build_arch(backbone))
    n = sum(p.numel() for p in net.parameters()) / 1e6
    assert round(n, 2 if n < 1 else 1) == millions


def test_backbone_width_multiplier_scales_widths_and_stem() -> None:
    cfg = build_arch("resnet50", width_multiplier=0.5)
    assert cfg.widths == (32, 64, 128, 256) and cfg.stem_width == 32


# --------------------------------------------------------------------------- per-stage broadcasting


def test_config_single_value_applies_to_every_stage() -> None:
    cfg = build_arch("resnet50", placement="pre", reduction=8, pooling="gem")
    assert cfg.placements == ("pre",) * 4
    assert cfg.reductions == (8,) * 4
    assert cfg.poolings == ("gem",) * 4


def test_config_one_element_sequence_applies_to_every_stage() -> None:
    cfg = build_arch("resnet20", placement=("post",), reduction=(2,))
    assert cfg.placements == ("post",) * 3 and cfg.reductions == (2,) * 3


def test_config_per_stage_values_reach_the_units() -> None:
    placements = ("none", "standard", "pre", "identity")
    reductions = (2, 4, 8, 16)
    poolings = ("avg", "max", "std", "gem")
    cfg = build_arch("resnet50", placement=placements, reduction=reductions, pooling=poolings,
                     width_multiplier=0.25)  # fmt: skip
    net = build_network(cfg)
    expansion = BRANCHES.get(cfg.block).expansion
    for stage, placement, r, pooling, width in zip(
        net.stages, placements, reductions, poolings, cfg.widths, strict=True
    ):
        for unit in stage:
            assert unit.placement == placement
            if placement == "none":
                assert isinstance(unit.se, nn.Identity)
                continue
            channels = unit.se.channels
            assert channels == (width * expansion if placement != "pre" else unit.branch[0].in_channels)
            assert unit.se.fc1.out_features == max(1, channels // r)
            assert type(unit.se.pool) is POOLINGS.get(pooling)


def test_config_with_se_returns_a_new_config() -> None:
    base = build_arch("resnet20")
    changed = base.with_se(placement=("standard", "none", "post"))
    assert base.placements == ("none",) * 3
    assert changed.placements == ("standard", "none", "post")


def test_config_is_frozen() -> None:
    cfg = build_arch("resnet20")
    with pytest.raises(AttributeError):
        cfg.block = "bottleneck"  # type: ignore[misc]


# --------------------------------------------------------------------------- invalid configs

PLACEMENT_NAMES = ", ".join(PLACEMENTS.names())
POOLING_NAMES = ", ".join(POOLINGS.names())


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"placement": "sandwich"}, "placements[0]", PLACEMENT_NAMES),
        ({"placement": ("standard", "sandwich", "none", "none")}, "placements[1]", PLACEMENT_NAMES),
        ({"pooling": "median"}, "poolings[0]", POOLING_NAMES),
        ({"pooling": ("avg", "avg", "avg", "lp")}, "poolings[3]", POOLING_NAMES),
        ({"reduction": 0}, "reductions[0]", "integer >= 1"),
        ({"reduction": (16, 16, -1, 16)}, "reductions[2]", "integer >= 1"),
        ({"reduction": 2.5}, "reductions[0]", "integer >= 1"),
        ({"placement": ("standard", "pre")}, "placements", "exactly 4"),
        ({"reduction": (4, 8, 16)}, "reductions", "exactly 4"),
        ({"pooling": ("avg",) * 5}, "poolings", "exactly 4"),
        ({"image_size": 0}, "image_size", "integer >= 1"),
        ({"num_classes": 0}, "num_classes", "integer >= 1"),
        ({"width_multiplier": 0.0}, "width_multiplier", "> 0"),
    ],
)
def test_config_invalid_value_names_field_and_allowed(
    kwargs: dict[str, Any], field: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_arch("resnet50", **kwargs)
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert allowed in message, message


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("block", "pyramid", ", ".join(BRANCHES.names())),
        ("stem", "patchify", "cifar, imagenet, whiten"),
        ("shortcut", "zero", "pad, conv"),
        ("transition", "pool", "unit, conv_pool"),
        ("head_pool", "min", "avg, max"),
        ("conv_init", "xavier", "kaiming, torch"),
    ],
)
def test_config_unknown_name_lists_allowed(field: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: unknown value '{value}'; allowed: {allowed}$"):
        build_arch("resnet20").replace(**{field: value})


def test_config_no_stages_is_an_error() -> None:
    with pytest.raises(ConfigError, match="widths"):
        ArchConfig(widths=(), depths=(), strides=(), placements=(), reductions=(), poolings=())


def test_config_unknown_backbone_lists_allowed() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'; allowed: resnet20"):
        build_arch("resnet9")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("scale", [0, -0.125, float("inf"), float("nan"), True, "0.125"])
def test_config_logit_scale_must_be_a_positive_finite_number(scale: Any) -> None:
    with pytest.raises(ConfigError, match=r"^logit_scale: must be a finite number > 0, got "):
        build_arch("fastnet").replace(logit_scale=scale)


@pytest.mark.parametrize(("backbone", "reduce", "scale"), [("fastnet", "mean", 1.0), ("fastnet_page", "amax", 0.125)])
def test_backbone_head_pools_and_scales_the_logits(backbone: str, reduce: str, scale: float) -> None:
    torch.manual_seed(0)
    net = build_network(build_arch(backbone, placement="standard", width_multiplier=0.25)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = net.stages(net.stem(x))
        expected = net.fc(getattr(features, reduce)(dim=(2, 3))) * scale
        assert torch.allclose(net(x), expected, atol=1e-6)
        # The two heads differ: a max pool is not the mean the other backbone takes.
        other = net.fc(features.mean(dim=(2, 3)) if reduce == "amax" else features.amax(dim=(2, 3))) * scale
        assert not torch.allclose(net(x), other, atol=1e-3)


def test_backbone_conv_init_torch_keeps_pytorch_default_scale() -> None:
    """Kaiming fan-out normal has std sqrt(2 / (9 out)); nn.Conv2d's default (uniform, a = sqrt(5)) has std
    1 / sqrt(3 x 9 in): at 3x3, 128 -> 128 the first is ~2.45x the second."""
    torch.manual_seed(0)
    stds = {}
    for backbone in ("fastnet", "fastnet_page"):
        unit = build_network(build_arch(backbone)).stages[0][-1]
        stds[backbone] = next(m for m in unit.modules() if isinstance(m, nn.Conv2d)).weight.std().item()
    assert stds["fastnet"] == pytest.approx((2 / (9 * 128)) ** 0.5, rel=0.05)
    assert stds["fastnet_page"] == pytest.approx(1 / (3 * 9 * 128) ** 0.5, rel=0.05)


def test_backbone_fastnet_page_is_fastnet_with_another_head_and_init() -> None:
    """Same layers and parameters (so the same cost), only the head's pool, logit scale and init differ."""
    page, fast = build_network(build_arch("fastnet_page")), build_network(build_arch("fastnet"))
    assert [(n, p.shape) for n, p in page.named_parameters()] == [(n, p.shape) for n, p in fast.named_parameters()]
    assert isinstance(page.pool, nn.AdaptiveMaxPool2d) and isinstance(fast.pool, nn.AdaptiveAvgPool2d)
