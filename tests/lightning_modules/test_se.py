"""The SE block and its pooling registry: each pooling against its textbook formula, GeM's learnable p, the
registry's refusal of duplicate names and the hidden width max(1, C // r) of Hu et al., eq. 3."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lightning_modules.registry import Registry
from lightning_modules.se import POOLINGS, SEBlock, SqueezePooling, se_hidden_width


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(2)


# The expected statistics, written directly from each method's definition (not from the implementation).
EXPECTED: dict[str, Callable[[torch.Tensor], list[torch.Tensor]]] = {
    "avg": lambda z: [_flat(z).sum(-1) / _flat(z).shape[-1]],
    "max": lambda z: [_flat(z).max(-1).values],
    "avgmax": lambda z: [_flat(z).sum(-1) / _flat(z).shape[-1], _flat(z).max(-1).values],
    "std": lambda z: [
        (((_flat(z) - _flat(z).mean(-1, keepdim=True)) ** 2).mean(-1) + 1e-5).sqrt(),
    ],
    "gem": lambda z: [(_flat(z).clamp(min=1e-6) ** 3).mean(-1) ** (1 / 3)],
}


def test_poolings_registry_has_an_expected_formula_for_every_entry() -> None:
    assert set(POOLINGS.names()) == set(EXPECTED)


@pytest.mark.parametrize("name", POOLINGS.names())
def test_pooling_matches_direct_formula(name: str) -> None:
    torch.manual_seed(0)
    z = torch.randn(2, 5, 4, 3)
    pool = POOLINGS.get(name)()
    assert isinstance(pool, SqueezePooling)
    got, expected = pool(z), EXPECTED[name](z)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == (2, 5)
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", POOLINGS.names())
def test_pooling_ops_per_element_is_a_positive_int(name: str) -> None:
    ops = POOLINGS.get(name).ops_per_element
    assert isinstance(ops, int) and ops >= 1


def test_gem_p_is_learnable() -> None:
    se = SEBlock(8, reduction=2, pooling="gem")
    p = se.pool.p
    assert isinstance(p, torch.nn.Parameter) and p.requires_grad
    assert any(q is p for q in se.parameters())
    se(torch.rand(2, 8, 5, 5) + 0.1).square().sum().backward()
    assert p.grad is not None and torch.isfinite(p.grad) and p.grad != 0


def test_gem_p_one_is_average_pooling() -> None:
    pool = POOLINGS.get("gem")(p=1.0)
    z = torch.rand(2, 3, 4, 4) + 0.1
    torch.testing.assert_close(pool(z)[0], z.mean(dim=(2, 3)))


def test_registry_refuses_duplicate_name() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a")(2)
    assert reg.get("a") == 1


def test_poolings_registry_refuses_existing_name() -> None:
    before = POOLINGS.names()
    with pytest.raises(ValueError, match="already registered"):
        POOLINGS.register("avg")(SqueezePooling)
    assert POOLINGS.names() == before and POOLINGS.get("avg") is not SqueezePooling


def test_registry_unknown_name_lists_allowed() -> None:
    with pytest.raises(ValueError, match="unknown pooling 'median'; allowed: avg, max"):
        POOLINGS.get("median")


@pytest.mark.parametrize(
    ("channels", "reduction", "hidden"), [(64, 16, 4), (256, 16, 16), (16, 16, 1), (8, 16, 1), (10, 3, 3)]
)
def test_se_hidden_width_is_max_one_c_floordiv_r(channels: int, reduction: int, hidden: int) -> None:
    assert se_hidden_width(channels, reduction) == hidden
    se = SEBlock(channels, reduction)
    assert (se.fc1.in_features, se.fc1.out_features) == (channels, hidden)
    assert (se.fc2.in_features, se.fc2.out_features) == (hidden, channels)


def test_se_block_rejects_reduction_below_one() -> None:
    with pytest.raises(ValueError, match="reduction"):
        SEBlock(8, reduction=0)


@pytest.mark.parametrize("name", POOLINGS.names())
def test_se_block_equals_formula(name: str) -> None:
    torch.manual_seed(1)
    se = SEBlock(6, reduction=2, pooling=name)
    z = torch.randn(3, 6, 4, 4)
    logits = sum(se.fc2(torch.relu(se.fc1(s))) for s in EXPECTED[name](z))
    expected = z * torch.sigmoid(logits)[:, :, None, None]
    out = se(z)
    assert out.shape == z.shape
    torch.testing.assert_close(out, expected)
