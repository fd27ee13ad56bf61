#!/usr/bin/env python3
"""Check DenseNet gradients: analytic (autograd) against numerical (finite differences).

In float64, for a dense layer, a dense block, a transition and a whole tiny DenseNet, in the
standard and the memory-efficient mode, on the CPU (contiguous inputs take the ATen path,
channels-last ones the fused path of fused.py) and on CUDA when there is one; then the
gradients of the same model on CPU and CUDA against each other. Exits 1 and names the part
that failed when anything disagrees.

  attic/gradcheck.py
  attic/gradcheck.py --growth-rate 6 --no-bottleneck
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch import nn

from densenet import DenseBlock, DenseLayer, DenseNet, Transition
from densenet_trainer.config import cli
from densenet_trainer.speed import apply_fused_kernels


def parts(growth_rate: int, bottleneck: bool, memory_efficient: bool) -> dict[str, tuple[nn.Module, Callable]]:
    """The pieces to check, each with a function that makes an input batch for it."""
    k, channels = growth_rate, 2 * growth_rate
    return {
        "dense layer": (DenseLayer(channels, k, bottleneck, 0.0, memory_efficient),
                        lambda: [torch.randn(3, channels, 6, 6)]),
        "dense block": (DenseBlock(2, channels, k, bottleneck, 0.0, memory_efficient),
                        lambda: torch.randn(3, channels, 6, 6)),
        "transition": (Transition(channels, channels // 2, 0.0), lambda: torch.randn(3, channels, 6, 6)),
        "densenet": (DenseNet(10 if bottleneck else 7, k, bottleneck=bottleneck, compression=0.5, num_classes=4,
                              memory_efficient=memory_efficient), lambda: torch.randn(2, 3, 8, 8)),
    }


def check(module: nn.Module, inputs, device: torch.device, layout: torch.memory_format,
          eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-8) -> list[str]:
    """Compare autograd with central differences for the input and every parameter.

    For each tensor t, a random direction u: the analytic <dL/dt, u> from one backward pass
    against (L(t + eps u) - L(t - eps u)) / 2 eps, where L = <module(x), w> for a fixed
    random w. Checking tensor by tensor names the one that is wrong. (torch.autograd.gradcheck
    runs backward repeatedly over one graph, which selective checkpointing does not allow.)
    Returns the mismatches, empty when all agree.
    """
    module = module.to(device, torch.float64).train()
    apply_fused_kernels(module)  # channels-last inputs take the fused path, contiguous ones ATen's
    as_list = isinstance(inputs, list)
    x = (inputs[0] if as_list else inputs).to(device, torch.float64)
    x = x.contiguous(memory_format=layout).requires_grad_()
    generator = torch.Generator().manual_seed(0)

    def random_like(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device)

    def objective() -> torch.Tensor:
        return (module([x] if as_list else x) * weights).sum()

    with torch.no_grad():
        weights = random_like(module([x] if as_list else x))
    tensors = {"input": x, **dict(module.named_parameters())}
    analytic = torch.autograd.grad(objective(), list(tensors.values()))
    problems = []
    with torch.no_grad():
        for (name, tensor), gradient in zip(tensors.items(), analytic):
            direction = random_like(tensor)
            tensor.add_(eps * direction)
            plus = objective()
            tensor.sub_(2 * eps * direction)
            minus = objective()
            tensor.add_(eps * direction)
            numerical = ((plus - minus) / (2 * eps)).item()
            expected = (gradient * direction).sum().item()
            if abs(expected - numerical) > atol + rtol * abs(numerical):
                problems.append(f"{name}: autograd {expected:.10g} vs finite differences {numerical:.10g}")
    return problems


def gradients(module: nn.Module, inputs, device: torch.device) -> list[torch.Tensor]:
    """Every parameter's gradient of a fixed objective, as copies on the CPU.

    Copies: ``.cpu()`` of a CPU gradient is that very tensor, and moving the module to another
    device or dtype afterwards moves its gradients, and so what was returned, with it.
    """
    module = module.to(device, torch.float64).train()
    apply_fused_kernels(module)
    module.zero_grad()
    x = [inputs[0].to(device, torch.float64)] if isinstance(inputs, list) else inputs.to(device, torch.float64)
    module(x).square().sum().backward()
    return [p.grad.to("cpu", copy=True) for p in module.parameters()]


def main(argv: list[str] | None = None) -> int:
    p = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--growth-rate", type=cli.positive_int, default=4, help="k of the checked parts")
    p.add_argument("--bottleneck", action=argparse.BooleanOptionalAction, default=True,
                   help="check DenseNet-B layers (1x1 conv first)")
    p.add_argument("--seed", type=cli.seed, default=0, help="seeds weights, inputs and directions")
    args = p.parse_args(argv)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    failures = 0
    for device in devices:
        for layout_name, layout in layouts.items():
            for efficient in (False, True):
                torch.manual_seed(args.seed)
                for name, (module, make_input) in parts(args.growth_rate, args.bottleneck, efficient).items():
                    problems = check(module, make_input(), device, layout)
                    mode = "memory-efficient" if efficient else "standard"
                    print(f"{'FAIL' if problems else 'ok  '}  {device.type:4}  {layout_name:13}  "
                          f"{mode:16}  {name}" + "".join(f"\n      {problem}" for problem in problems))
                    failures += len(problems)
    if len(devices) > 1:
        torch.manual_seed(args.seed)
        for name, (module, make_input) in parts(args.growth_rate, args.bottleneck, False).items():
            inputs = make_input()
            cpu = gradients(module, inputs, devices[0])
            cuda = gradients(module, inputs, devices[1])
            worst = max((a - b).abs().max().item() for a, b in zip(cpu, cuda))
            agree = worst < 1e-8
            print(f"{'ok  ' if agree else 'FAIL'}  cpu vs cuda  {name}: largest difference {worst:.2e}")
            failures += not agree
    print(f"{failures} failure(s)" if failures else "all gradients agree")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
