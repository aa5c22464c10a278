"""Cost accounting for an architecture config: parameters, multiply-accumulates (MACs) and FLOPs.

Convention (DESIGN.md, "Cost accounting"), per forward pass of ONE image of ``cfg.image_size`` squared with
``cfg.in_channels`` channels:

- ``Conv2d``: output elements x in_channels / groups x kh x kw MACs; ``Linear``: in x out per sample (bias
  adds are not counted, as in ``torch.utils.flop_counter``);
- the SE block's own work, which ``torch.utils.flop_counter`` and most counters leave at zero so that every SE
  variant would look free: the squeeze pooling costs ``pool.ops_per_element`` x C x H x W, the gate its two
  linear layers (above, once per pooled statistic) plus C for the sigmoid, and the channel scaling C x H x W
  multiplies; each elementwise operation counts as one MAC;
- batch norm, ReLU, residual adds, max pools, the head's global pool and its logit scaling are not counted: that is the
  convention behind the published ResNet figures (the SE paper's 3.86 GFLOPs for ResNet-50 are multiply-adds
  of convolutions and the classifier).

FLOPs are reported as 2 x MACs. Parameters are the network's learnable tensors (batch-norm affine included, also where
a recipe freezes the scales, so a network's count does not depend on how it is trained; running
statistics excluded), so plain ``resnet50`` matches torchvision's 25,557,032 and standard SE-ResNet-50
(r = 16, avg) the published 28,088,024.

The network is built on the meta device (no weight initialisation is run), given zero-filled CPU storage and
run on one image on the CPU: the counters need only shapes. Running on meta tensors instead does no
arithmetic, but every operator then goes through Python shape functions: a whole count of resnet20 on 16x16
digits took 140 ms of CPU that way against 47 ms now, while fastnet_whiten on CIFAR and ResNet-50/101 at 224
cost about the same either way (2026-11-30, one thread). Every trial pays one count, so the small networks
of fast studies decide. A module that cannot be built on meta is built normally.

Command line::

    python -m search.cost --backbone resnet50 --placement standard --reduction 16 --pooling avg \
        --image-size 224 --json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_modules.backbones import BACKBONES, build_arch, build_network
from lightning_modules.config import ArchConfig, ConfigError
from lightning_modules.se import POOLINGS, SEBlock, SqueezePooling
from lightning_modules.units import PLACEMENTS
from search.errors import UsageError, UsageParser

__all__ = ["Cost", "count_cost", "main"]

MacCounter = Callable[[nn.Module, tuple[Any, ...], Any], int]


@dataclass(frozen=True)
class Cost:
    """Parameters, MACs and FLOPs (= 2 x MACs) of one forward pass on one image."""

    params: int
    macs: int
    flops: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "flops", 2 * self.macs)

    def to_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs, "flops": self.flops}


def _conv_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    assert isinstance(module, nn.Conv2d)
    kh, kw = module.kernel_size
    return output.numel() * (module.in_channels // module.groups) * kh * kw


def _linear_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    assert isinstance(module, nn.Linear)
    return output.numel() * module.in_features


def _pooling_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    assert isinstance(module, SqueezePooling)
    return module.ops_per_element * inputs[0].numel()


def _se_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    """The sigmoid (C per sample) and the channel scaling (C x H x W); pooling and MLP count themselves."""
    z = inputs[0]
    return z.shape[0] * z.shape[1] + z.numel()


# One counter per counted module type; a module is matched by the first of its classes (MRO) found here, so a
# subclass of Conv2d or of SqueezePooling is counted without a new entry. Everything else counts zero.
_COUNTERS: dict[type[nn.Module], MacCounter] = {
    nn.Conv2d: _conv_macs,
    nn.Linear: _linear_macs,
    SqueezePooling: _pooling_macs,
    SEBlock: _se_macs,
}


def _counter_for(module: nn.Module) -> MacCounter | None:
    for cls in type(module).__mro__:
        if cls in _COUNTERS:
            return _COUNTERS[cls]
    return None


def _count_macs(net: nn.Module, cfg: ArchConfig) -> int:
    """Run one image through ``net`` (on the CPU) and sum the counters' MACs over every module call."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal total
        counter = _counter_for(module)
        if counter is not None:
            total += int(counter(module, inputs, output))

    handles = [m.register_forward_hook(hook) for m in net.modules() if _counter_for(m) is not None]
    try:
        # eval(): batch norm in training mode refuses one value per channel (a 1x1 map at batch size 1).
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size))
    finally:
        for h in handles:
            h.remove()
    return total


@functools.lru_cache(maxsize=1024)  # configs are frozen and hashable; studies revisit networks
def count_cost(cfg: ArchConfig) -> Cost:
    """Parameters, MACs and FLOPs of the network ``cfg`` describes, per image (see the module docstring)."""
    try:
        with torch.device("meta"):
            net = build_network(cfg)
        net = net.to_empty(device="cpu")
        with torch.no_grad():  # defined values, so nothing in the pass depends on leftover memory
            for tensor in itertools.chain(net.parameters(), net.buffers()):
                tensor.zero_()
    except (NotImplementedError, RuntimeError):
        net = build_network(cfg)  # some initialiser without a meta kernel: build it for real
    macs = _count_macs(net, cfg)
    params = sum(p.numel() for p in net.parameters())
    return Cost(params=params, macs=macs)


# --------------------------------------------------------------------------------------------- command line


def _split(flag: str, text: str, allowed: str) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    if any(not s for s in items):
        raise UsageError(
            f"{flag}: empty entry in {text!r}; give one value or a comma list, one per stage, of: {allowed}"
        )
    return items


def _per_stage(flag: str, items: list[Any], num_stages: int, backbone: str) -> tuple[Any, ...]:
    if len(items) not in (1, num_stages):
        raise UsageError(
            f"{flag}: got {len(items)} values for backbone {backbone!r} with {num_stages} stages; "
            f"give one value for all stages or exactly {num_stages}"
        )
    return tuple(items) if len(items) > 1 else (items[0],) * num_stages


def _names(flag: str, text: str, allowed: Sequence[str], num_stages: int, backbone: str) -> tuple[str, ...]:
    items = _split(flag, text, ", ".join(allowed))
    for item in items:
        if item not in allowed:
            raise UsageError(f"{flag}: unknown value {item!r}; allowed: {', '.join(allowed)}")
    return _per_stage(flag, items, num_stages, backbone)


def _ratios(text: str, num_stages: int, backbone: str) -> tuple[int, ...]:
    values: list[int] = []
    for item in _split("--reduction", text, "integers >= 1"):
        if not item.isdecimal() or int(item) < 1:
            raise UsageError(f"--reduction: {item!r} is not an integer >= 1; allowed: integers >= 1")
        values.append(int(item))
    return _per_stage("--reduction", values, num_stages, backbone)


def _positive_int(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    if not text.strip().isdecimal() or int(text) < 1:
        raise UsageError(f"{flag}: {text!r} is not an integer >= 1; allowed: integers >= 1")
    return int(text)


def _parser() -> UsageParser:
    parser = UsageParser(
        prog="python -m search.cost",
        description=(
            "Parameters, MACs and FLOPs (= 2 x MACs) of an SE network, per image. MACs count convolutions "
            "and linear layers plus each SE block's pooling, sigmoid and channel scaling (one MAC per "
            "elementwise op); batch norm, ReLU, residual adds and the head's global pool are not counted."
        ),
    )
    parser.add_argument("--backbone", required=True, help=f"one of: {', '.join(BACKBONES.names())}")
    parser.add_argument(
        "--placement",
        default="none",
        help=f"one value, or a comma list with one per stage, of: {', '.join(PLACEMENTS.names())}",
    )
    parser.add_argument(
        "--reduction",
        default="16",
        help="SE reduction ratio r >= 1; one value or a comma list, one per stage",
    )
    parser.add_argument(
        "--pooling",
        default="avg",
        help=f"squeeze pooling; one value or a comma list, one per stage, of: {', '.join(POOLINGS.names())}",
    )
    parser.add_argument("--image-size", default=None, help="input side (default: the preset's)")
    parser.add_argument("--num-classes", default=None, help="classifier outputs (default: the preset's)")
    parser.add_argument("--in-channels", default=None, help="input channels (default: the preset's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object {params, macs, flops}")
    return parser


def _config(args: argparse.Namespace) -> ArchConfig:
    if args.backbone not in BACKBONES:
        raise UsageError(
            f"--backbone: unknown value {args.backbone!r}; allowed: {', '.join(BACKBONES.names())}"
        )
    stages = BACKBONES.get(args.backbone)().num_stages
    return build_arch(
        args.backbone,
        placement=_names("--placement", args.placement, PLACEMENTS.names(), stages, args.backbone),
        reduction=_ratios(args.reduction, stages, args.backbone),
        pooling=_names("--pooling", args.pooling, POOLINGS.names(), stages, args.backbone),
        num_classes=_positive_int("--num-classes", args.num_classes),
        image_size=_positive_int("--image-size", args.image_size),
        in_channels=_positive_int("--in-channels", args.in_channels),
    )


def _si(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return str(n)


def _describe(cfg: ArchConfig, backbone: str, cost: Cost) -> str:
    def stages(values: tuple[Any, ...]) -> str:
        return str(values[0]) if len(set(values)) == 1 else ",".join(map(str, values))

    size = cfg.image_size
    return "\n".join(
        [
            f"{backbone}: placement {stages(cfg.placements)}, reduction {stages(cfg.reductions)}, "
            f"pooling {stages(cfg.poolings)}; per image of {size}x{size}x{cfg.in_channels}, "
            f"{cfg.num_classes} classes",
            f"params  {cost.params:,} ({_si(cost.params)})",
            f"MACs    {cost.macs:,} ({_si(cost.macs)} multiply-accumulates; SE pooling, gating and scaling "
            "included)",
            f"FLOPs   {cost.flops:,} ({_si(cost.flops)}; = 2 x MACs)",
            "counted: convolutions, linear layers, SE pooling/sigmoid/scaling (one MAC per elementwise op); "
            "not counted: batch norm, ReLU, residual adds, max pools, the head's global pool",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the cost of one backbone with SE choices; bad input is one ``error:`` line and status 2."""
    try:
        args = _parser().parse_args(argv)
        cfg = _config(args)
        cost = count_cost(cfg)
    except (UsageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. an image too small for the backbone's downsampling
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"error: --image-size {args.image_size}: cannot run {args.backbone!r} on it ({first})",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps(cost.to_dict()))
    else:
        print(_describe(cfg, args.backbone, cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
