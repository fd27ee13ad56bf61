"""Batches on the training device: the training batches of an epoch, augmented there, and
the evaluation batches.

Whole datasets are small (CIFAR: 150 MB as uint8), so they live on the training device and
every batch is gathered, normalised and augmented there in a few tensor operations: no
per-image Python or PIL work in the training loop.

The epoch's order and augmentation come from one CPU ``torch.Generator``. An epoch is
planned at its start (order, crop offsets, flips) from the generator's state, so a run
resumed from a saved state, on any device or number of processes, sees the same batches.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from densenet_trainer.engine.datasets import DataError, Split

PAD = 4  # the paper's augmentation: 4-pixel zero padding, random 32x32 crop, random flip


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


class Normalizer:
    """uint8 images -> normalised float: (x / 255 - mean) / std, as one multiply-add."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device) -> None:
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1 / (255 * std_t)
        self.shift = -mean_t / std_t

    def __call__(self, images: Tensor) -> Tensor:
        return torch.addcmul(self.shift, images.float(), self.scale)


class TrainBatches:
    """Shuffled, augmented training batches gathered on the device.

    ``batch_size`` is the global batch (divisible by ``world_size``): each process takes its
    own contiguous share of every batch, so all of them together see what one process would.
    The last incomplete batch of an epoch is dropped (the order changes every epoch).

    ``plan_epoch`` draws an epoch's order, crop offsets and flips on the host and copies them
    into one device tensor, ``plan``, that stays at the same address; ``batch`` reads batch
    number ``step``, a device tensor, from it. So a step never waits for the host, and a CUDA
    graph that captured one step replays any other.
    """

    def __init__(self, data: Split, batch_size: int, normalizer: Normalizer, augment: bool,
                 seed: int, device: torch.device, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False) -> None:
        if len(data) < batch_size:
            raise DataError(f"the training set has {len(data)} images, fewer than one batch "
                            f"of {batch_size}; lower --batch-size")
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size, self.normalizer, self.augment = batch_size, normalizer, augment
        self.device, self.rank, self.world_size = device, rank, world_size
        self.memory_format = memory_format(channels_last)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = len(data) // batch_size
        self.share = batch_size // world_size
        # per step and image of this process's share: index, crop row, crop column, flip
        self.plan = torch.zeros((self.steps, self.share, 4), dtype=torch.int64, device=device)

    def state(self) -> Tensor:
        """The generator state from which the next epoch is planned."""
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    def plan_epoch(self) -> None:
        """Draw the next epoch's order, crops and flips, and put this process's share in ``plan``."""
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator)
        offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=self.generator)
        flips = torch.rand(n, generator=self.generator) < 0.5
        drawn = torch.cat([order[:, None], offsets, flips[:, None].long()], 1)
        every = drawn[:self.steps * self.batch_size].view(self.steps, self.world_size, self.share, 4)
        self.plan.copy_(every[:, self.rank])

    def batch(self, step: Tensor) -> tuple[Tensor, Tensor]:
        """(images, labels) of batch ``step`` (a one-element int64 tensor on the device) of
        the planned epoch, normalised and augmented, without reading ``step`` on the host."""
        rows = self.plan.index_select(0, step).squeeze(0)
        index = rows[:, 0]
        images = self.normalizer(self.images.index_select(0, index))
        if self.augment:
            images = random_crop_flip(images, rows[:, 1:3], rows[:, 3].bool())
        return images.contiguous(memory_format=self.memory_format), self.labels.index_select(0, index)

    def epoch(self, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Plan the next epoch and yield its batches from ``start_step`` on (tools and tests)."""
        self.plan_epoch()
        for step in range(start_step, self.steps):
            yield self.batch(torch.tensor([step], device=self.device))


def random_crop_flip(images: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
    """Zero-pad by PAD, crop 32x32 at per-image ``offsets`` (row, col), mirror where ``flips``.

    Padding follows normalisation, as in the authors' code, so padded pixels are the mean
    colour. One gather does crop and flip for the whole batch.
    """
    size = images.shape[-1]
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    span = torch.arange(size, device=images.device)
    rows = offsets[:, :1] + span
    cols = offsets[:, 1:] + torch.where(flips[:, None], size - 1 - span, span)
    batch = torch.arange(len(images), device=images.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def eval_batches(data: Split, batch_size: int, normalizer: Normalizer, device: torch.device,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False
                 ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield (images, labels, valid) over this process's share of ``data``, in order.

    Every batch has one shape (``batch_size``, or the share when smaller), so cuDNN's choice
    of algorithms and any captured graph fit them all: the last batch is padded with copies of
    the dataset's first image, and ``valid`` marks the real rows.
    """
    where = data.labels.device  # indices and masks are made there: no copy from the host per batch
    indices = torch.tensor_split(torch.arange(len(data), device=where), world_size)[rank]
    size = max(1, min(batch_size, -(-len(data) // world_size)))
    layout = memory_format(channels_last)
    for chunk in indices.split(size) if len(indices) else [indices]:
        valid = torch.arange(size, device=where) < len(chunk)
        chunk = torch.cat([chunk, chunk.new_zeros(size - len(chunk))])
        images = normalizer(data.images[chunk].to(device, non_blocking=True))
        yield images.contiguous(memory_format=layout), data.labels[chunk].to(device), valid.to(device)
