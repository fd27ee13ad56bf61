"""Low precision in one cast of all weights a step, where autocast casts each weight apart.

``CastWeights`` is loop.Autocast's stand-in, computing the same numbers: the convolutions and
the classifier see their weights cast to the compute type in one multi-tensor copy per step
(``_CastAll``), and their gradients cast back in one more, where autocast launches a cast per
weight each way (about 200 kernels a DenseNet-BC-100 step). ``precision_of`` is what build.py
hands the step and evaluation.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from densenet_trainer.loop.training import COMPUTE_DTYPES, Autocast


class _CastAll(torch.autograd.Function):
    """Tensors to ``dtype`` in one multi-tensor copy; their gradients back in one more."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.dtypes = [t.dtype for t in tensors]
        out = [torch.empty_like(t, dtype=dtype) for t in tensors]
        torch._foreach_copy_(out, list(tensors))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        out = [torch.empty_like(g, dtype=dtype) for g, dtype in zip(grads, ctx.dtypes)]
        torch._foreach_copy_(out, list(grads))
        return (None, *out)


class CastWeights:
    """Makes ``model`` compute in ``precision`` (fp32, bf16 or fp16) within ``computing()``.

    In low precision the convolutions and the classifier see their weights cast all at once
    (``_CastAll``), for forward and backward alike: the memory-efficient mode recomputes
    layers during backward and must see the same weights. The BatchNorms keep float32 weights
    and normalise low-precision inputs, as under autocast, which gives the same numbers
    (tests/unit/test_step.py).
    """

    def __init__(self, model: nn.Module, precision: str) -> None:
        self.dtype = COMPUTE_DTYPES[precision]
        self.slots = [(module, name) for module in model.modules()
                      if isinstance(module, (nn.Conv2d, nn.Linear))
                      for name, _ in module.named_parameters(recurse=False)]

    def inputs(self, images: Tensor) -> Tensor:
        return images.to(self.dtype) if self.dtype is not None else images

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        weights = [module._parameters[name] for module, name in self.slots]
        cast = _CastAll.apply(self.dtype, *weights)
        for (module, name), tensor in zip(self.slots, cast):
            module._parameters[name] = tensor  # read as module.weight; not a Parameter
        try:
            yield
        finally:
            for (module, name), weight in zip(self.slots, weights):
                module._parameters[name] = weight


def precision_of(model: nn.Module, precision: str) -> CastWeights | Autocast:
    """How ``model`` computes in ``precision``: CastWeights, or for a torch.compile'd model
    Autocast (the compiler fuses those casts itself, and swapping its weights would make it
    recompile)."""
    return Autocast(model, precision) if hasattr(model, "_orig_mod") else CastWeights(model, precision)
