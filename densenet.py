"""DenseNet and DenseNet-BC for 32x32 images (CIFAR-10, CIFAR-100, SVHN).

The architecture of *Densely Connected Convolutional Networks* (Huang et al., CVPR 2017,
arXiv 1608.06993), section 3 and Table 2: a 3x3 stem convolution, three dense blocks at
32x32, 16x16 and 8x8 joined by transitions, then BN-ReLU, global average pooling and a
linear classifier. With ``bottleneck=True, compression=0.5`` this is DenseNet-BC; the
parameter counts match Table 2 exactly (see tests/unit/test_densenet.py).

Plain ``nn`` modules and ATen operations: a layer concatenates its inputs and runs
BatchNorm, ReLU and convolution. The trainer's fused kernels (one buffer a block, BatchNorm-ReLU
in one pass: ``densenet_trainer.speed``) are put on a built model from outside, in one call,
``apply_fused_kernels(model)``; they compute the same function, and this module knows nothing
of them.

``memory_efficient=True`` stores only the convolutions' outputs of each dense layer and
recomputes its concatenation, BatchNorms and ReLUs during the backward pass, which makes
activation memory grow linearly rather than quadratically with depth at the cost of a few
memory-bound passes. It gives the same outputs, gradients and BatchNorm running statistics
as the standard mode.

This module depends on torch alone and on config/architecture.py for the architecture's
rules (valid depths, names), which the command line checks too.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from densenet_trainer.config.architecture import (  # the rules flags share
    check_config,
    model_name,
    valid_depths,
)

__all__ = ["DenseNet", "check_config", "model_name", "valid_depths"]


@contextlib.contextmanager
def _running_stats_frozen(norm: nn.modules.batchnorm._BatchNorm) -> Iterator[None]:
    """Run ``norm`` in training mode without updating its running statistics.

    A momentum of 0 leaves running_mean and running_var bit-for-bit unchanged (this also
    works for SyncBatchNorm), and hiding the batch counter keeps it from counting. No tensor
    operation happens here: inside a recomputation, checkpointing replays operations in order.
    """
    momentum, tracked = norm.momentum, norm.num_batches_tracked
    norm.momentum, norm.num_batches_tracked = 0.0, None
    try:
        yield
    finally:
        norm.momentum, norm.num_batches_tracked = momentum, tracked


class DenseLayer(nn.Module):
    """BN-ReLU-Conv(3x3, k) on the concatenation of all earlier feature maps.

    With a bottleneck, BN-ReLU-Conv(1x1, 4k) comes first. Dropout follows every conv.
    """

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool,
                 dropout: float, memory_efficient: bool) -> None:
        super().__init__()
        first_out = 4 * growth_rate if bottleneck else growth_rate
        first_kernel = 1 if bottleneck else 3
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, first_out, first_kernel,
                               padding=first_kernel // 2, bias=False)
        if bottleneck:
            self.norm2 = nn.BatchNorm2d(first_out)
            self.conv2 = nn.Conv2d(first_out, growth_rate, 3, padding=1, bias=False)
        self.bottleneck = bottleneck
        self.dropout = dropout
        self.memory_efficient = memory_efficient

    def _layer(self, *features: Tensor) -> Tensor:
        """Concatenate, then BN-ReLU-Conv, and with the bottleneck BN-ReLU-Conv again.

        ReLU runs in place: BN keeps its input for backward, not its output.
        """
        activated = F.relu(self.norm1(torch.cat(features, 1)), inplace=True)
        return self._after_first_conv(self.conv1(activated))

    def _after_first_conv(self, out: Tensor) -> Tensor:
        """Dropout, and with the bottleneck BN-ReLU-Conv(3x3) and dropout again."""
        if self.dropout:
            out = F.dropout(out, self.dropout, self.training)
        if self.bottleneck:
            out = self.norm_relu_conv(self.norm2, self.conv2, out)
            if self.dropout:
                out = F.dropout(out, self.dropout, self.training)
        return out

    @staticmethod
    def norm_relu_conv(norm: nn.BatchNorm2d, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """``conv(relu(norm(x)))``, the ReLU in place (BN keeps its input, not its output); one
        method, so that a subclass may compute it otherwise (speed/fused_densenet.py)."""
        return conv(F.relu(norm(x), inplace=True))

    def _checkpointed(self, layer, *inputs: Tensor) -> Tensor:
        """``layer(*inputs)`` storing only its convolutions' outputs; the rest is recomputed.

        The concatenation and the BN-ReLU outputs, the tensors that grow
        with depth, are rebuilt from the earlier layers' outputs when backward needs them; the convolutions,
        the costly part, are not run twice. The recomputation must not move the BatchNorm
        running statistics a second time.
        """
        recomputing = False

        def run(*args: Tensor) -> Tensor:
            nonlocal recomputing
            norms = [self.norm1, self.norm2] if self.bottleneck else [self.norm1]
            with contextlib.ExitStack() as stack:
                if recomputing:
                    for norm in norms:
                        stack.enter_context(_running_stats_frozen(norm))
                recomputing = True
                return layer(*args)

        # Only dropout draws random numbers in a layer: without it there is no RNG state to
        # stash and restore (host work each layer, and a CUDA graph cannot read the state).
        return torch.utils.checkpoint.checkpoint(
            run, *inputs, use_reentrant=False, preserve_rng_state=self.dropout > 0,
            context_fn=functools.partial(create_selective_checkpoint_contexts, _save_convolutions))

    def forward(self, features: list[Tensor]) -> Tensor:
        """The new feature map from all earlier ones."""
        if self.memory_efficient and _needs_grad(*features):
            return self._checkpointed(self._layer, *features)
        return self._layer(*features)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _save_convolutions(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing policy: keep convolution outputs, recompute everything else."""
    if op is torch.ops.aten.convolution.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class DenseBlock(nn.Module):
    """``num_layers`` dense layers; returns the block input and every layer's output, joined."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bottleneck: bool,
                 dropout: float, memory_efficient: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, bottleneck, dropout,
                       memory_efficient)
            for i in range(num_layers))
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv(1x1) to ``out_channels`` (compression), dropout, 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.Dropout(dropout),
            nn.AvgPool2d(2),
        )


class DenseNet(nn.Module):
    """The paper's CIFAR/SVHN DenseNet; returns logits of shape (batch, num_classes).

    ``DenseNet(100, 12)`` is DenseNet-BC-100-12; every other argument is a keyword, e.g.
    ``DenseNet(40, 12, bottleneck=False, compression=1)`` for the plain DenseNet-40-12.

    Args:
        depth: L, the number of layers with weights (4 + 3n, or 4 + 6n with bottleneck).
        growth_rate: k, feature maps added by each dense layer.
        bottleneck: use a 1x1 conv to 4k maps before each 3x3 conv (DenseNet-B).
        compression: theta in (0, 1]; a transition outputs floor(theta * m) maps (DenseNet-C).
        dropout: rate after every conv but the first (the paper uses 0.2 without augmentation).
        num_classes: classifier outputs.
        memory_efficient: keep only conv outputs; recompute concatenation, BN and ReLU in backward.

    ``densenet_trainer.speed.apply_fused_kernels(model)`` makes a built model compute its
    dense blocks and BatchNorm-ReLUs with the fused kernels; it is still this class's model.
    """

    def __init__(self, depth: int = 100, growth_rate: int = 12, *, bottleneck: bool = True,
                 compression: float = 0.5, dropout: float = 0.0, num_classes: int = 10,
                 memory_efficient: bool = False) -> None:
        super().__init__()
        check_config(depth, growth_rate, bottleneck, compression, dropout, num_classes)
        step, _ = valid_depths(bottleneck)
        layers_per_block = (depth - 4) // step
        channels = 2 * growth_rate if bottleneck else 16
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for index in range(3):
            block = DenseBlock(layers_per_block, channels, growth_rate, bottleneck, dropout,
                               memory_efficient)
            stages.append(block)
            channels = block.out_channels
            if index < 2:
                reduced = math.floor(compression * channels)
                stages.append(Transition(channels, reduced, dropout))
                channels = reduced
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(channels)
        self.classifier = nn.Linear(channels, num_classes)
        self.name = model_name(depth, growth_rate, bottleneck, compression)
        self._init_weights()

    def _init_weights(self) -> None:
        """He et al. normal init for convs (fan_out, as the authors' code), BN 1/0, bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    @staticmethod
    def norm_relu(norm: nn.BatchNorm2d, x: Tensor) -> Tensor:
        """``relu(norm(x))`` in place; one method, so that a subclass may compute it otherwise."""
        return F.relu(norm(x), inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm_relu(self.norm, self.features(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)
