"""The architecture's arithmetic, from the paper: which depths a DenseNet or DenseNet-BC can
have, which settings can be built (and how many parameters they would have, counted without
building them), and the model's short name. torch-free: run_config.py and plot.py use it too.
"""
from __future__ import annotations

import math


def valid_depths(bottleneck: bool) -> tuple[int, int]:
    """Return (step, smallest) of the valid depths: depth = 4 + step * n for n >= 1.

    Depth counts the stem conv, every conv in the blocks, the two transition convs and the
    classifier. Each of the three blocks has (L - 4) / 3 convs, i.e. (L - 4) / 6 layers
    when every layer has a bottleneck conv as well.
    """
    step = 6 if bottleneck else 3
    return step, 4 + step


def check_config(depth: int, growth_rate: int, bottleneck: bool, compression: float,
                 dropout: float = 0.0, num_classes: int = 10) -> None:
    """Raise ValueError, saying what would be valid, for a configuration that cannot be built."""
    step, smallest = valid_depths(bottleneck)
    if depth < smallest or (depth - 4) % step:
        kind = "DenseNet-BC (bottleneck)" if bottleneck else "DenseNet without bottleneck"
        lower = max(smallest, 4 + (depth - 4) // step * step)
        upper = max(smallest, lower + step) if depth > lower else lower
        nearest = f"{lower} or {upper}" if lower != upper else f"{lower}"
        raise ValueError(f"depth {depth} is impossible for {kind}: depth - 4 must be a "
                         f"positive multiple of {step}; nearest valid depths: {nearest}")
    if growth_rate < 1:
        raise ValueError(f"growth rate must be a positive integer, got {growth_rate}")
    if not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1], got {compression}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    channels = 2 * growth_rate if bottleneck else 16
    for transition in (1, 2):  # every layer must keep at least one channel
        channels += (depth - 4) // step * growth_rate
        kept = math.floor(compression * channels)
        if kept < 1:
            raise ValueError(f"compression {compression:g} leaves transition {transition} no "
                             f"channels (floor({compression:g} x {channels}) = 0); use at least "
                             f"{1 / channels:.3g}")
        channels = kept
    parameters = parameter_count(depth, growth_rate, bottleneck, compression, num_classes)
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"this DenseNet would have {parameters:,} parameters ({parameters * 16 / 2**30:,.0f} "
                         f"GiB with gradients and optimiser state, before any activation); at "
                         f"most {MAX_PARAMETERS:,} are built: choose a smaller depth or growth rate")


MAX_PARAMETERS = 1_000_000_000  # 40 times DenseNet-BC-190-40, the paper's largest


def parameter_count(depth: int, growth_rate: int, bottleneck: bool, compression: float,
                    num_classes: int = 10) -> int:
    """The parameters of the DenseNet these settings describe, counted without building it
    (densenet.py's layers: convolutions without bias, BatchNorm weight and bias, the
    classifier), so that an enormous model is refused before memory is allocated."""
    step, _ = valid_depths(bottleneck)
    k, channels = growth_rate, 2 * growth_rate if bottleneck else 16
    layers = (depth - 4) // step  # per block
    total = 3 * 9 * channels  # the stem
    for block in range(3):
        # the layers' inputs: channels, channels + k, ...; summed in closed form, so that an
        # absurd depth is counted (and refused) at once
        inputs = layers * channels + k * layers * (layers - 1) // 2
        if bottleneck:  # BN(c), 1x1 conv c -> 4k, BN(4k), 3x3 conv 4k -> k
            total += (2 + 4 * k) * inputs + layers * (2 * 4 * k + 4 * k * k * 9)
        else:  # BN(c), 3x3 conv c -> k
            total += (2 + 9 * k) * inputs
        channels += layers * k
        if block < 2:
            kept = math.floor(compression * channels)
            total += 2 * channels + channels * kept
            channels = kept
    return total + 2 * channels + channels * num_classes + num_classes


def model_name(depth: int, growth_rate: int, bottleneck: bool, compression: float) -> str:
    """A short name for a configuration, e.g. ``densenet-bc-100-12`` or ``densenet-40-12``.

    The paper's suffixes: B for the bottleneck, C for compression below 1.
    """
    suffix = ("b" if bottleneck else "") + ("c" if compression < 1 else "")
    variant = f"densenet-{suffix}" if suffix else "densenet"
    if compression < 1 and compression != 0.5:
        variant += f"{compression:g}"
    return f"{variant}-{depth}-{growth_rate}"
