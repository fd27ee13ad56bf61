"""A trained model for inference, from its checkpoint: train.py --evaluate and
attic/predict.py classify with it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from densenet import DenseNet
from densenet_trainer.engine import data
from densenet_trainer.run.build import build_model
from densenet_trainer.run.checkpoint import Checkpoint, restore
from densenet_trainer.settings.config import RunConfig


@dataclass
class Trained:
    """A trained model, ready for inference: in evaluation mode, on its device, in the run's
    memory layout, with the run's normalisation."""
    checkpoint: Checkpoint
    model: DenseNet
    normalizer: data.Normalizer
    device: torch.device

    @property
    def config(self) -> RunConfig:
        return self.checkpoint.config

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, 32, 32) as the model takes them."""
        normalized = self.normalizer(images.to(self.device))
        return normalized.contiguous(memory_format=data.memory_format(self.config.channels_last))


def load_trained(checkpoint: Checkpoint, device: torch.device) -> Trained:
    """The trained model of ``checkpoint`` (read with at least INFERENCE_KEYS), on ``device``."""
    model = build_model(checkpoint.config, checkpoint.config.kernels_on(device.type))
    restore(model, checkpoint.state["model"], checkpoint.path)
    model.to(device, memory_format=data.memory_format(checkpoint.config.channels_last)).eval()
    normalization = checkpoint.state["normalization"]
    normalizer = data.Normalizer(normalization["mean"], normalization["std"], device)
    return Trained(checkpoint, model, normalizer, device)
