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

from densenet_trainer.data.datasets import DataError, Split

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


class EvalBatches:
    """This process's share of a split's evaluation batches, gathered where the images are
    and in order; iterating yields (images, labels, valid) for each.

    Every batch has one shape (``batch_size``, or the share when smaller), so cuDNN's choice
    of algorithms and a captured graph fit them all: the last batch is padded with copies of
    the dataset's first image, and ``valid`` marks the real rows. Indices and masks are made
    once, on the images' device; ``batch`` reads batch number ``step``, a one-element device
    tensor, without the host, so that a CUDA graph that captured one batch's evaluation
    replays any other (cuda_graph.GraphedEvaluation). ``total_images`` counts the split's
    images over all processes.
    """

    def __init__(self, data: Split, batch_size: int, normalizer: Normalizer, device: torch.device,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False) -> None:
        where = data.labels.device
        share = torch.tensor_split(torch.arange(len(data), device=where), world_size)[rank]
        size = max(1, min(batch_size, -(-len(data) // world_size)))
        self.steps = max(1, -(-len(share) // size))
        slots = self.steps * size
        self.rows = torch.cat([share, share.new_zeros(slots - len(share))]).view(self.steps, size)
        self.valid = (torch.arange(slots, device=where) < len(share)).view(self.steps, size)
        self.numbers = torch.arange(self.steps, device=where)  # each batch's step, without a copy
        self.data, self.normalizer, self.device = data, normalizer, device
        self.memory_format = memory_format(channels_last)
        self.total_images = len(data)

    def batch(self, step: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(images, labels, valid) of batch ``step``, a one-element int64 tensor where the
        images are."""
        rows = self.rows.index_select(0, step).squeeze(0)
        images = self.normalizer(self.data.images.index_select(0, rows).to(self.device, non_blocking=True))
        return (images.contiguous(memory_format=self.memory_format),
                self.data.labels.index_select(0, rows).to(self.device),
                self.valid.index_select(0, step).squeeze(0).to(self.device))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for step in range(self.steps):
            yield self.batch(self.numbers[step:step + 1])
