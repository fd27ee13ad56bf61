"""densenet.py's DenseNet computed with the fused kernels (fused.py), put on a built model.

Each class here is densenet.py's with a forward of its own, so that a fused model is the same
model (the same modules, parameters, state dict and forward hooks; but where its channels are
padded, in bfloat16 on CUDA, a dense layer's output carries its zero channels and a padded
convolution's own hooks are passed over: conv_padding): each dense block writes
its features once into one shared buffer and every BatchNorm-ReLU is one fused pass; the
BatchNorms count their batch in one operation (``batch_counters``). ``fuse`` turns a built
``DenseNet`` into one by the classes of its modules alone;
``densenet_trainer.speed.apply_fused_kernels`` fuses once the kernels have passed their
self-test on a device type (``tested_on``). Wherever the kernels do not apply to a tensor
(``fused.available``: contiguous or other-typed inputs, autocast, torch.compile) or its device
type was not tested, each part computes as densenet.py's does.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from densenet import DenseBlock, DenseLayer, DenseNet, Transition
from densenet_trainer.speed import conv_padding, fused, fused_gemm, pass_counters

tested_on: set[str] = set()  # device types whose self-test passed in this process
_warned: set[str] = set()  # device types a fused model has said it was not tested on


def usable(x: Tensor) -> bool:
    """Whether ``x`` takes the fused path: fused.available, on a tested device type."""
    return x.device.type in tested_on and fused.available(x)


class FusedDenseNet(DenseNet):
    def forward(self, x: Tensor) -> Tensor:
        if x.device.type not in tested_on and x.device.type not in _warned:
            _warned.add(x.device.type)
            warnings.warn(f"the fused kernels were not tested on {x.device.type}: the model computes "
                          f"with ATen's operations there; apply them after moving the model",
                          stacklevel=2)
        # the fused BatchNorms count their batch all at once; the passes share the model's counters
        with fused.batch_counters(), pass_counters.of_model(self, x.device):
            return super().forward(x)

    @staticmethod
    def norm_relu(norm: nn.BatchNorm2d, x: Tensor) -> Tensor:
        """``relu(norm(x))``, fused where it can be."""
        return fused.batch_norm_relu(norm, x) if usable(x) else DenseNet.norm_relu(norm, x)


class FusedDenseBlock(DenseBlock):
    """The block's features joined as they are made, in one fused.SharedFeatures buffer; each
    layer's output carries zero channels where the device's convolutions want them padded
    (conv_padding.padded_outputs)."""

    def forward(self, x: Tensor) -> Tensor:
        if not usable(x):
            return super().forward(x)
        # batch statistics only for BatchNorms in training mode: evaluation copies the features
        batch_stats = any(layer.norm1.training for layer in self.layers)
        shared = fused.SharedFeatures.for_block(x, self.out_channels, batch_stats)
        newest = x
        with conv_padding.padded_outputs([last_conv(layer) for layer in self.layers]):
            for layer in self.layers:
                newest = layer(newest, shared)
                shared.append(newest, last_conv(layer).out_channels)
        return fused.gather(shared, newest)


def last_conv(layer: DenseLayer) -> nn.Conv2d:
    """The convolution that writes a dense layer's new feature."""
    return layer.conv2 if layer.bottleneck else layer.conv1


class FusedDenseLayer(DenseLayer):
    def forward(self, features: list[Tensor] | Tensor,
                shared: fused.SharedFeatures | None = None) -> Tensor:
        """The new feature map: ATen's path where ``features`` lists the earlier ones; the
        fused one where they are in ``shared`` and ``features`` is the newest alone. Memory-
        efficient, the first BN-ReLU's output is then recomputed in backward by the fused
        kernel instead of stored (no checkpointing, no convolution run twice)."""
        if shared is None:
            return super().forward(features)
        width = conv_padding.conv_channels(features, self.norm1.num_features)
        if self.memory_efficient and torch.is_grad_enabled() and features.requires_grad:
            weight = conv_padding.padded_input(conv_padding.compute_weight(self.conv1), width)
            return self._after_first_conv(fused.norm_relu_conv(self.norm1, self.conv1, weight, shared, features))
        activated = fused.norm_relu(self.norm1, shared, features, width)
        return self._after_first_conv(conv_padding.conv(self.conv1, activated))

    @staticmethod
    def norm_relu_conv(norm: nn.BatchNorm2d, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """``conv(relu(norm(x)))``, BatchNorm-ReLU fused where it can be, with the convolution's
        input channels padded where the device's convolutions want it (conv_padding)."""
        if usable(x):
            width = conv_padding.conv_channels(x, norm.num_features)
            return conv_padding.conv(conv, fused.batch_norm_relu(norm, x, width))
        return DenseLayer.norm_relu_conv(norm, conv, x)


class FusedTransition(Transition):
    def forward(self, x: Tensor) -> Tensor:
        norm, _, conv, dropout, pool = self  # the ReLU is fused with the norm where it can be
        return pool(dropout(FusedDenseLayer.norm_relu_conv(norm, conv, x)))


class GemmDenseLayer(FusedDenseLayer):
    """--kernels fused-gemm: a bottleneck's 1x1 convolution is fused_gemm's GEMM, which
    normalises the block's buffer as it loads it, where it applies (fused_gemm.applies);
    memory-efficient or not, it stores no activation and runs no convolution twice."""

    def forward(self, features: list[Tensor] | Tensor,
                shared: fused.SharedFeatures | None = None) -> Tensor:
        if shared is None or not self.bottleneck or not fused_gemm.applies(self.conv1, features):
            return super().forward(features, shared)
        # the result carries norm2's batch statistics, unless dropout comes between
        next_norm = None if self.dropout and self.training else self.norm2
        return self._after_first_conv(fused_gemm.norm_relu_matmul(self.norm1, self.conv1, shared,
                                                                   features, next_norm))


FUSED = {DenseNet: FusedDenseNet, DenseBlock: FusedDenseBlock, DenseLayer: FusedDenseLayer,
         Transition: FusedTransition}
PLAIN = {fused_class: plain_class for plain_class, fused_class in FUSED.items()} | {GemmDenseLayer: DenseLayer}


def fuse(model: nn.Module, gemm: bool = False) -> None:
    """Make every DenseNet module of ``model`` its fused class, with ``gemm`` GemmDenseLayer
    for its layers, whichever classes they had (torchvision's or other modules are left as
    they are)."""
    unfuse(model)
    for module in model.modules():
        if type(module) in FUSED:
            module.__class__ = GemmDenseLayer if gemm and type(module) is DenseLayer else FUSED[type(module)]


def unfuse(model: nn.Module) -> None:
    """Undo ``fuse``: every fused module of ``model`` back to densenet.py's class."""
    for module in model.modules():
        if type(module) in PLAIN:
            module.__class__ = PLAIN[type(module)]


def is_fused(model: nn.Module) -> bool:
    return isinstance(model, FusedDenseNet)


def kernels_of(model: nn.Module) -> str:
    """The --kernels value that ``model`` computes with: "fused-gemm", "fused" or "aten"."""
    if any(isinstance(module, GemmDenseLayer) for module in model.modules()):
        return "fused-gemm"
    return "fused" if is_fused(model) else "aten"

