"""Cost accounting against hand-computed formulas, torchvision, torch's flop counter and the SE paper.

Published figures: torchvision's ResNet-50 has 25,557,032 parameters and 4.09 GMACs (its model card's
"GFLOPS"); SE-ResNet-50 (r = 16) has 28,088,024 parameters (the Caffe/pretrainedmodels release); the SE
paper (Hu et al., TPAMI 2019, Table 2) gives 3.86 -> 3.87 GFLOPs (multiply-adds) for the Caffe ResNet-50,
whose stride sits on the first 1x1 (our ``resnet50_v1``).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import search.cost as cost_module
from lightning_modules import BACKBONES, PLACEMENTS, POOLINGS, ArchConfig, SEBlock, build_arch, build_network
from search.cost import Cost, count_cost, main
from search.pareto import cost_ranges
from search.study_config import load_study

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _torch_macs(net: nn.Module, cfg: ArchConfig) -> int:
    """MACs by ``torch.utils.flop_counter`` (convolutions and matmuls only), on the meta device."""
    with FlopCounterMode(display=False) as counter:
        net.eval()(torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta"))
    return counter.get_total_flops() // 2


def _meta_net(cfg: ArchConfig) -> nn.Module:
    with torch.device("meta"):
        return build_network(cfg)


# --------------------------------------------------------------------------- small nets by hand


def _conv(h: int, w: int, c_in: int, c_out: int, k: int) -> tuple[int, int]:
    """(MACs, params) of a bias-free k x k conv producing an h x w map, plus its batch norm's 2 c_out."""
    return h * w * c_out * c_in * k * k, c_in * c_out * k * k + 2 * c_out


def _se(c: int, h: int, w: int, r: int, pooling: str) -> tuple[int, int]:
    """(MACs, params) of one SE block on a C x H x W input, by the documented convention."""
    hidden = max(1, c // r)
    stats = 2 if pooling == "avgmax" else 1
    ops = {"avg": 1, "max": 1, "avgmax": 2, "std": 2, "gem": 2}[pooling]
    macs = ops * c * h * w + stats * 2 * c * hidden + c + c * h * w
    params = 2 * c * hidden + hidden + c + (1 if pooling == "gem" else 0)
    return macs, params


def _tiny(placement: str, pooling: str, r: int = 2) -> ArchConfig:
    """Two basic stages of widths 4 and 8 on an 8 x 8 input: identity shortcut, then a strided projection."""
    return ArchConfig(
        widths=(4, 8), depths=(1, 1), strides=(1, 2), placements=placement, reductions=r, poolings=pooling,
        block="basic", stem="cifar", stem_width=4, shortcut="conv", num_classes=3, in_channels=3,
        image_size=8,
    )  # fmt: skip


def _tiny_by_hand(placement: str, pooling: str, r: int = 2) -> tuple[int, int]:
    parts = [
        _conv(8, 8, 3, 4, 3),  # stem
        _conv(8, 8, 4, 4, 3), _conv(8, 8, 4, 4, 3),  # stage 1 branch, identity shortcut
        _conv(4, 4, 4, 8, 3), _conv(4, 4, 8, 8, 3),  # stage 2 branch, stride 2
        _conv(4, 4, 4, 8, 1),  # stage 2 projection shortcut
        (8 * 3, 8 * 3 + 3),  # head
    ]  # fmt: skip
    if placement == "pre":  # SE on each unit's input: 4 x 8 x 8 both times (before stage 2's stride)
        parts += [_se(4, 8, 8, r, pooling), _se(4, 8, 8, r, pooling)]
    elif placement != "none":  # on the unit's output (branch, shortcut or sum: same shape)
        parts += [_se(4, 8, 8, r, pooling), _se(8, 4, 4, r, pooling)]
    return sum(m for m, _ in parts), sum(p for _, p in parts)


@pytest.mark.parametrize("pooling", POOLINGS.names())
@pytest.mark.parametrize("placement", PLACEMENTS.names())
def test_count_cost_tiny_net_matches_hand_formula(placement: str, pooling: str) -> None:
    macs, params = _tiny_by_hand(placement, pooling)
    assert count_cost(_tiny(placement, pooling)) == Cost(params=params, macs=macs)


def test_count_cost_tiny_bottleneck_matches_hand_formula() -> None:
    cfg = ArchConfig(
        widths=(2,), depths=(2,), strides=(2,), placements="standard", reductions=4, poolings="avg",
        block="bottleneck", stem="cifar", stem_width=4, shortcut="conv", num_classes=5, image_size=6,
    )  # fmt: skip
    parts = [
        _conv(6, 6, 3, 4, 3),  # stem
        _conv(6, 6, 4, 2, 1), _conv(3, 3, 2, 2, 3), _conv(3, 3, 2, 8, 1),  # unit 1, stride on the 3x3
        _conv(3, 3, 4, 8, 1),  # unit 1 projection
        _conv(3, 3, 8, 2, 1), _conv(3, 3, 2, 2, 3), _conv(3, 3, 2, 8, 1),  # unit 2
        _se(8, 3, 3, 4, "avg"), _se(8, 3, 3, 4, "avg"),
        (8 * 5, 8 * 5 + 5),  # head
    ]  # fmt: skip
    expected = Cost(params=sum(p for _, p in parts), macs=sum(m for m, _ in parts))
    assert count_cost(cfg) == expected


def test_count_cost_per_stage_choices_are_counted_per_stage() -> None:
    cfg = _tiny("none", "avg").with_se(
        placement=("standard", "none"), reduction=(1, 2), pooling=("gem", "avg")
    )
    macs, params = _tiny_by_hand("none", "avg")
    se_macs, se_params = _se(4, 8, 8, 1, "gem")
    assert count_cost(cfg) == Cost(params=params + se_params, macs=macs + se_macs)


def test_count_cost_flops_are_twice_macs_and_dict_has_three_keys() -> None:
    cost = count_cost(_tiny("standard", "avg"))
    assert cost.flops == 2 * cost.macs
    assert cost.to_dict() == {"params": cost.params, "macs": cost.macs, "flops": cost.flops}
    assert Cost(params=1, macs=5).flops == 10


def test_count_cost_builds_for_real_when_meta_build_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    built_on: list[str] = []

    def no_meta(cfg: ArchConfig) -> nn.Module:
        built_on.append(torch.empty(()).device.type)
        if built_on[-1] == "meta":
            raise NotImplementedError("no meta kernel")
        return build_network(cfg)

    cfg = _tiny("pre", "avgmax")
    expected = count_cost(cfg)
    count_cost.cache_clear()  # else the second call is the first one's cached answer
    monkeypatch.setattr(cost_module, "build_network", no_meta)
    assert count_cost(cfg) == expected
    assert built_on == ["meta", "cpu"]


@pytest.mark.parametrize("backbone", ["resnet20", "fastnet_whiten"])
def test_count_cost_does_not_depend_on_weights(backbone: str) -> None:
    """The count runs zero-filled weights; a trained-looking network (real initialisation) counts the same."""
    cfg = build_arch(backbone, placement=("standard", "pre", "post"), reduction=4, pooling="gem")
    count_cost.cache_clear()
    assert count_cost(cfg).macs == cost_module._count_macs(build_network(cfg), cfg)


# --------------------------------------------------------------------------- published architectures


@pytest.mark.parametrize(
    ("backbone", "params", "gmacs"), [("resnet50", 25_557_032, 4.09), ("resnet101", 44_549_160, 7.80)]
)
def test_count_cost_resnet_equals_torchvision(backbone: str, params: int, gmacs: float) -> None:
    """Parameters exactly torchvision's; MACs exactly torch's flop counter on torchvision's own model, and
    its model card's GFLOPS (which are multiply-adds)."""
    with torch.device("meta"):
        reference = getattr(torchvision.models, backbone)()
    cfg = build_arch(backbone)
    cost = count_cost(cfg)
    assert cost.params == sum(p.numel() for p in reference.parameters()) == params
    assert cost.macs == _torch_macs(reference, cfg)
    assert round(cost.macs / 1e9, 2) == gmacs


def test_count_cost_se_resnet50_has_published_parameter_count() -> None:
    for backbone in ("resnet50", "resnet50_v1"):
        cost = count_cost(build_arch(backbone, placement="standard", reduction=16, pooling="avg"))
        assert cost.params == 28_088_024


def test_count_cost_resnet50_v1_matches_se_paper_gflops() -> None:
    """3.86 -> 3.87 G multiply-adds (Hu et al., Table 2); SE adds ~0.35% compute and ~10% parameters."""
    plain = count_cost(build_arch("resnet50_v1"))
    se = count_cost(build_arch("resnet50_v1", placement="standard", reduction=16, pooling="avg"))
    assert plain.params == 25_557_032
    assert round(plain.macs / 1e9, 2) == 3.86
    assert round(se.macs / 1e9, 2) == 3.87
    assert 0.003 < se.macs / plain.macs - 1 < 0.004
    assert 0.09 < se.params / plain.params - 1 < 0.11


def test_count_cost_se_resnet50_exceeds_torch_count_by_pooling_sigmoid_scaling() -> None:
    """Closed form for standard SE-ResNet-50 (avg): each unit's SE adds C x H x W (pool) + C (sigmoid)
    + C x H x W (scale) to what torch's counter sees; stages of (C, H, units) = (256, 56, 3), (512, 28, 4),
    (1024, 14, 6), (2048, 7, 3)."""
    cfg = build_arch("resnet50", placement="standard", reduction=16, pooling="avg")
    stages = ((256, 56, 3), (512, 28, 4), (1024, 14, 6), (2048, 7, 3))
    extra = sum(n * (2 * c * h * h + c) for c, h, n in stages)
    assert extra == 11_053_824
    assert count_cost(cfg).macs - _torch_macs(_meta_net(cfg), cfg) == extra


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_count_cost_without_se_equals_torch_flop_counter(backbone: str) -> None:
    cfg = build_arch(backbone)
    assert count_cost(cfg).macs == _torch_macs(_meta_net(cfg), cfg)


@pytest.mark.parametrize("pooling", POOLINGS.names())
@pytest.mark.parametrize("placement", ["standard", "pre", "post", "identity"])
def test_count_cost_se_excess_over_torch_is_pooling_sigmoid_scaling(placement: str, pooling: str) -> None:
    """Every placement and pooling, on the CIFAR ResNet-18 (strided projections, so ``pre`` sees the
    pre-stride input); the SE blocks' input shapes are read off forward hooks."""
    cfg = build_arch("cifar_resnet18", placement=placement, reduction=16, pooling=pooling)
    net = _meta_net(cfg)
    shapes: list[torch.Size] = []
    hooks = [
        m.register_forward_hook(lambda _m, inputs, _out: shapes.append(inputs[0].shape))
        for m in net.modules()
        if isinstance(m, SEBlock)
    ]
    torch_macs = _torch_macs(net, cfg)
    for h in hooks:
        h.remove()
    assert len(shapes) == 8
    ops = POOLINGS.get(pooling).ops_per_element
    extra = sum((ops + 1) * c * h * w + c for _, c, h, w in shapes)
    assert count_cost(cfg).macs - torch_macs == extra


def test_count_cost_se_resnet101_has_published_parameter_count() -> None:
    """49.33 M, as timm's and pretrainedmodels' SE-ResNet-101."""
    cost = count_cost(build_arch("resnet101", placement="standard", reduction=16, pooling="avg"))
    assert round(cost.params / 1e6, 2) == 49.33


@pytest.mark.parametrize("pooling", POOLINGS.names())
def test_count_cost_runs_on_the_meta_device(pooling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No pooling needs the CPU fallback, so counting allocates nothing and does no arithmetic."""

    def meta_only(cfg: ArchConfig) -> nn.Module:
        assert torch.empty(()).device.type == "meta", "count_cost fell back to the CPU"
        return build_network(cfg)

    monkeypatch.setattr(cost_module, "build_network", meta_only)
    cfg = build_arch("resnet50", placement=("standard", "pre", "post", "identity"), pooling=pooling)
    assert count_cost(cfg).macs > 4_089_184_256


# --------------------------------------------------------------------------- command line


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "search.cost", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_json_prints_published_se_resnet50_count() -> None:
    done = _cli(
        "--backbone", "resnet50", "--placement", "standard", "--reduction", "16", "--pooling", "avg",
        "--image-size", "224", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"params", "macs", "flops"}
    assert result["params"] == 28_088_024
    assert result["flops"] == 2 * result["macs"] == 2 * 4_102_753_024


def test_cli_human_readable_states_the_convention(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--backbone", "resnet20", "--placement", "standard,none,post", "--pooling", "gem"]) == 0
    out = capsys.readouterr().out
    assert "multiply-accumulates" in out and "SE pooling, gating and scaling included" in out
    assert "= 2 x MACs" in out
    cost = count_cost(build_arch("resnet20", placement=("standard", "none", "post"), pooling="gem"))
    assert f"{cost.params:,}" in out and f"{cost.macs:,}" in out and f"{cost.flops:,}" in out


def test_cli_bad_input_is_one_error_line_and_status_2() -> None:
    done = _cli("--backbone", "resnet50", "--placement", "sideways")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: --placement: unknown value 'sideways'; allowed: " + ", ".join(PLACEMENTS.names())
    ]


@pytest.mark.parametrize(
    ("args", "flag", "allowed"),
    [
        (["--backbone", "resnet9"], "--backbone", ", ".join(BACKBONES.names())),
        (["--backbone", "resnet50", "--pooling", "median"], "--pooling", ", ".join(POOLINGS.names())),
        (["--backbone", "resnet50", "--placement", "standard,pre"], "--placement", "exactly 4"),
        (["--backbone", "resnet20", "--reduction", "4,8"], "--reduction", "exactly 3"),
        (["--backbone", "resnet20", "--pooling", "avg,max,std,gem"], "--pooling", "exactly 3"),
        (["--backbone", "resnet50", "--reduction", "0"], "--reduction", "integers >= 1"),
        (["--backbone", "resnet50", "--reduction", "2.5"], "--reduction", "integers >= 1"),
        (["--backbone", "resnet50", "--reduction", "16,x,16,16"], "--reduction", "integers >= 1"),
        (["--backbone", "resnet50", "--image-size", "big"], "--image-size", "integers >= 1"),
        (["--backbone", "resnet50", "--image-size", "0"], "--image-size", "integers >= 1"),
        (["--backbone", "resnet50", "--placement", "pre,"], "--placement", ", ".join(PLACEMENTS.names())),
        ([], "--backbone", "required"),
    ],
)
def test_cli_bad_input_names_flag_and_allowed(
    args: list[str], flag: str, allowed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert flag in lines[0] and allowed in lines[0], lines[0]


def test_cli_main_json_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--backbone", "resnet20", "--image-size", "32", "--num-classes", "100", "--json"]) == 0
    expected = count_cost(build_arch("resnet20", num_classes=100, image_size=32))
    assert json.loads(capsys.readouterr().out) == expected.to_dict()


def test_cost_ranges_are_the_cheapest_and_costliest_networks_of_the_space(tmp_path: Path) -> None:
    """``cost_ranges`` (the hypervolume's cost axis) equals the brute-force minimum and maximum over every
    network a small space can build (per stage: none, or pre with ratio 4/8 and avg/avgmax; two widths)."""
    study = tmp_path / "small.yaml"
    study.write_text("backbone: resnet20\ndata: {dataset: digits, image_size: 8}\nsearch_space:\n"
                     "  width_multiplier: [0.25, 0.5]\n  placement: [none, pre]\n  reduction: [4, 8]\n"
                     "  pooling: [avg, avgmax]\n")
    cfg = load_study(str(study))
    shape = {"num_classes": 10, "in_channels": 1, "image_size": 8}
    ranges = cost_ranges(cfg, **shape)
    stage = [("none", 8, "avg"), *itertools.product(["pre"], [4, 8], ["avg", "avgmax"])]
    costs = []
    for width in (0.25, 0.5):
        base = build_arch("resnet20", width_multiplier=width, **shape)
        for choice in itertools.product(stage, repeat=base.num_stages):
            placements, reductions, poolings = zip(*choice, strict=True)
            costs.append(count_cost(base.with_se(placements, reductions, poolings)).to_dict())
    for key in ("flops", "params"):
        assert ranges[key] == [min(c[key] for c in costs), max(c[key] for c in costs)]
