"""The data path: CIFAR reading, augmentation on whole batches, shards, statistics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from densenet_trainer.data import datasets, loader


def test_random_crop_flip_matches_per_image_reference():
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    offsets = torch.randint(0, 2 * loader.PAD + 1, (6, 2))
    flips = torch.tensor([True, False, True, False, False, True])
    batched = loader.random_crop_flip(images, offsets, flips)
    for i in range(6):
        padded = F.pad(images[i], (loader.PAD,) * 4)
        row, col = offsets[i].tolist()
        expected = padded[:, row:row + 32, col:col + 32]
        if flips[i]:
            expected = expected.flip(-1)
        assert torch.equal(batched[i], expected)


def test_normalizer_uses_training_statistics(cifar_dir):
    train = datasets.load_dataset("cifar10", cifar_dir, download=False).train
    mean, std = datasets.channel_stats(train.images)
    normalized = loader.Normalizer(mean, std, torch.device("cpu"))(train.images)
    assert normalized.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (normalized.std(dim=(0, 2, 3), correction=0) - 1).abs().max() < 1e-4


def test_process_shards_together_are_the_single_process_batches(cifar_dir):
    train = datasets.load_dataset("cifar10", cifar_dir, download=False).train
    normalizer = loader.Normalizer([0.5] * 3, [0.25] * 3, torch.device("cpu"))

    def epoch(rank: int, world: int):
        return list(loader.TrainBatches(train, 32, normalizer, True, 7, torch.device("cpu"),
                                      rank, world).epoch())

    single = epoch(0, 1)
    shards = [epoch(rank, 2) for rank in range(2)]
    assert len(single) == 5
    for step, (images, labels) in enumerate(single):
        assert torch.equal(torch.cat([shards[r][step][0] for r in range(2)]), images)
        assert torch.equal(torch.cat([shards[r][step][1] for r in range(2)]), labels)


def test_resumed_generator_state_replays_the_epoch(cifar_dir):
    train = datasets.load_dataset("cifar10", cifar_dir, download=False).train
    normalizer = loader.Normalizer([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    batches = loader.TrainBatches(train, 32, normalizer, True, 3, torch.device("cpu"))
    state = batches.state()
    first = list(batches.epoch())
    assert not torch.equal(list(batches.epoch())[0][1], first[0][1])  # a new order each epoch
    batches.set_state(state)
    later = list(batches.epoch(start_step=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[2:], later))
