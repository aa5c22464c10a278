"""Placement semantics of the residual unit, tested by construction (Hu et al., TPAMI 2019, Fig. 5).

Each placement's unit gets the weights of a ``none`` unit, so its branch F and shortcut S are the reference
unit's; the SE gate is then pinned to a constant by zeroing fc2's weight (the gate becomes sigmoid(fc2.bias)
whatever the pooling sees). With the gate at 1 every placement must reduce to ``none``; with the gate at 0.5
the output must be the placement's formula with SE(z) = 0.5 z, which tells the placements apart:
``standard`` halves the branch, ``identity`` the shortcut (branch unscaled), ``post`` the activated sum and
``pre`` the branch's input. Covered for basic and bottleneck blocks, stride 1 and 2, both shortcut types.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_modules.se import POOLINGS
from lightning_modules.units import PLACEMENTS, PadShortcut, ResidualUnit, SameConv2d

# (block, shortcut, in_ch, width, stride, stride_in_1x1): identity shortcuts at stride 1 and projected or
# padded ones where stride and width change; the bottleneck output is 4 x width.
GEOMETRIES = [
    ("basic", "conv", 8, 8, 1, False),
    ("basic", "conv", 4, 8, 2, False),
    ("basic", "pad", 8, 8, 1, False),
    ("basic", "pad", 4, 8, 2, False),
    ("bottleneck", "conv", 16, 4, 1, False),
    ("bottleneck", "conv", 8, 4, 2, False),
    ("bottleneck", "conv", 8, 4, 2, True),
    ("bottleneck", "pad", 16, 4, 1, False),
    ("bottleneck", "pad", 8, 4, 2, False),
]
GEOMETRY_IDS = [f"{b}-{s}-in{i}-w{w}-s{st}{'-v1' if v1 else ''}" for b, s, i, w, st, v1 in GEOMETRIES]

Fn = Callable[[torch.Tensor], torch.Tensor]

# The placements' outputs with SE(z) = 0.5 z, in terms of the reference unit's F and S.
HALF_GATE: dict[str, Callable[[Fn, Fn, torch.Tensor], torch.Tensor]] = {
    "none": lambda f, s, x: torch.relu(f(x) + s(x)),
    "standard": lambda f, s, x: torch.relu(0.5 * f(x) + s(x)),
    "pre": lambda f, s, x: torch.relu(f(0.5 * x) + s(x)),
    "post": lambda f, s, x: 0.5 * torch.relu(f(x) + s(x)),
    "identity": lambda f, s, x: torch.relu(f(x) + 0.5 * s(x)),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(geometry: tuple, placement: str, pooling: str = "avg") -> ResidualUnit:
    block, shortcut, in_ch, width, stride, v1 = geometry
    return ResidualUnit(
        in_ch, width, stride, block=block, shortcut=shortcut, placement=placement, reduction=2,
        pooling=pooling, stride_in_1x1=v1,
    )  # fmt: skip


def _reference(geometry: tuple) -> ResidualUnit:
    """A ``none`` unit in eval mode with non-trivial batch-norm statistics and affine parameters."""
    torch.manual_seed(0)
    unit = _unit(geometry, "none")
    for m in unit.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0.0, 0.2)
    return unit.eval()


def _copy_of(reference: ResidualUnit, geometry: tuple, placement: str, pooling: str = "avg") -> ResidualUnit:
    unit = _unit(geometry, placement, pooling)
    missing, unexpected = unit.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected
    assert all(k.startswith("se.") for k in missing)
    return unit.eval()


def _pin_gate(unit: ResidualUnit, logit: float) -> None:
    with torch.no_grad():
        unit.se.fc2.weight.zero_()
        unit.se.fc2.bias.fill_(logit)


def _input(geometry: tuple) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, geometry[2], 8, 8)


def test_placements_registry_has_the_five_of_the_paper() -> None:
    assert set(PLACEMENTS.names()) == {"none", "standard", "pre", "post", "identity"}


@pytest.mark.parametrize("pooling", POOLINGS.names())
@pytest.mark.parametrize("placement", PLACEMENTS.names())
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_unit_with_gate_one_equals_none(geometry: tuple, placement: str, pooling: str) -> None:
    reference = _reference(geometry)
    unit = _copy_of(reference, geometry, placement, pooling)
    if PLACEMENTS.get(placement).uses_se:
        _pin_gate(unit, 50.0)  # sigmoid(50) == 1.0 in float32
    x = _input(geometry)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("placement", PLACEMENTS.names())
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_unit_with_gate_half_matches_placement_formula(geometry: tuple, placement: str) -> None:
    reference = _reference(geometry)
    unit = _copy_of(reference, geometry, placement)
    if PLACEMENTS.get(placement).uses_se:
        _pin_gate(unit, 0.0)  # sigmoid(0) == 0.5 exactly
    x = _input(geometry)
    with torch.no_grad():
        expected = HALF_GATE[placement](reference.branch, reference.shortcut, x)
        torch.testing.assert_close(unit(x), expected)


@pytest.mark.parametrize("placement", ["standard", "pre", "post", "identity"])
@pytest.mark.parametrize("geometry", GEOMETRIES[:2], ids=GEOMETRY_IDS[:2])
def test_unit_with_half_gate_differs_from_other_placements(geometry: tuple, placement: str) -> None:
    """Guards the test above: the four half-gated formulas really are different functions here."""
    x = _input(geometry)
    reference = _reference(geometry)
    with torch.no_grad():
        mine = HALF_GATE[placement](reference.branch, reference.shortcut, x)
        for other in set(HALF_GATE) - {placement}:
            other_out = HALF_GATE[other](reference.branch, reference.shortcut, x)
            assert not torch.allclose(mine, other_out, atol=1e-4)


@pytest.mark.parametrize("placement", PLACEMENTS.names())
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_unit_se_width_and_output_shape(geometry: tuple, placement: str) -> None:
    block, _, in_ch, width, stride, _ = geometry
    unit = _unit(geometry, placement)
    out_ch = width * (4 if block == "bottleneck" else 1)
    assert unit.out_channels == out_ch
    spec = PLACEMENTS.get(placement)
    if spec.uses_se:
        assert unit.se.channels == (in_ch if spec.se_on_input else out_ch)
    else:
        assert not any(k.startswith("se.") for k in unit.state_dict())
    out = unit(_input(geometry))
    assert out.shape == (2, out_ch, 8 // stride, 8 // stride)


@pytest.mark.parametrize("geometry", [g for g in GEOMETRIES if g[0] == "bottleneck" and g[4] == 2])
def test_bottleneck_stride_sits_where_stride_in_1x1_says(geometry: tuple) -> None:
    convs = [m for m in _unit(geometry, "none").branch if isinstance(m, nn.Conv2d)]
    strides = [c.stride[0] for c in convs]
    assert strides == ([2, 1, 1] if geometry[5] else [1, 2, 1])


def test_pad_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 3, 6, 6)
    out = PadShortcut(3, 5, 2)(x)
    assert out.shape == (2, 5, 3, 3)
    torch.testing.assert_close(out[:, :3], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 3:]) == 0


SAME_CONVS = [(3, 1, False), (3, 2, False), (1, 1, True), (1, 2, False), (5, 1, True)]  # (kernel, stride, bias)


@pytest.mark.parametrize("kernel,stride,bias", SAME_CONVS)
@pytest.mark.parametrize("size", [1, 3])
def test_same_conv_equals_nn_conv_in_output_and_gradients(kernel: int, stride: int, bias: bool, size: int) -> None:
    """SameConv2d's matrix product on 1x1 inputs (and nn.Conv2d's path on larger ones) gives what nn.Conv2d
    with the same weights gives: output, input gradient and the whole weight gradient (zero off the centre
    tap on a 1x1 input), so a network built with it trains exactly as one built with nn.Conv2d."""
    torch.manual_seed(0)
    same = SameConv2d(6, 5, kernel, stride, bias=bias).double()
    ref = nn.Conv2d(6, 5, kernel, stride, padding=kernel // 2, bias=bias).double()
    ref.load_state_dict(same.state_dict())
    x = torch.randn(4, 6, size, size, dtype=torch.float64)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_same, out_ref = same(xs), ref(xr)
    assert out_same.shape == out_ref.shape
    torch.testing.assert_close(out_same, out_ref)
    grad = torch.randn_like(out_ref)
    out_same.backward(grad)
    out_ref.backward(grad)
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(same.weight.grad, ref.weight.grad)
    if bias:
        torch.testing.assert_close(same.bias.grad, ref.bias.grad)
    if size == 1 and kernel > 1:  # the centre tap alone learns: the shortcut is exact, not an approximation
        off_centre = same.weight.grad.clone()
        off_centre[:, :, kernel // 2, kernel // 2] = 0
        assert off_centre.abs().max() == 0 and same.weight.grad.abs().max() > 0


def test_same_conv_refuses_an_even_kernel() -> None:
    with pytest.raises(ValueError, match="kernel must be odd"):
        SameConv2d(3, 3, 2)
