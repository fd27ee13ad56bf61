"""A trained model for inference, from its checkpoint: train.py --evaluate and
attic/predict.py classify with it; and the files an evaluation writes beside it."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from densenet import DenseNet
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.data import loader
from densenet_trainer.run.build import build_model
from densenet_trainer.run.checkpoint import Checkpoint, restore
from densenet_trainer.run.files import write_errors
from densenet_trainer.whole_files import refuse_unless_regular, write_text


@dataclass
class Trained:
    """A trained model, ready for inference: in evaluation mode, on its device, in the run's
    memory layout, with the run's normalisation."""
    checkpoint: Checkpoint
    model: DenseNet
    normalizer: loader.Normalizer
    device: torch.device

    @property
    def config(self) -> RunConfig:
        return self.checkpoint.config

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, 32, 32) as the model takes them."""
        normalized = self.normalizer(images.to(self.device))
        return normalized.contiguous(memory_format=loader.memory_format(self.config.channels_last))


def load_trained(checkpoint: Checkpoint, device: torch.device) -> Trained:
    """The trained model of ``checkpoint`` (read with at least INFERENCE_KEYS), on ``device``."""
    model = build_model(checkpoint.config, checkpoint.config.kernels_on(device.type), device)
    restore(model, checkpoint.state["model"], checkpoint.path)
    model.eval()
    normalization = checkpoint.state["normalization"]
    normalizer = loader.Normalizer(normalization["mean"], normalization["std"], device)
    return Trained(checkpoint, model, normalizer, device)


# ---------------------------------------------------------------- evaluation files

def runs_own_test(checkpoint: Checkpoint, fingerprint: str, data_dir: str, data_dir_given: bool) -> bool:
    """Whether the test images of ``fingerprint`` are the run's own: the one the checkpoint
    recorded; for a run of an earlier version, which recorded none, the data is read from the
    run's own folder."""
    recorded = checkpoint.state.get("data")
    if isinstance(recorded, dict) and isinstance(recorded.get("test"), dict):
        return recorded["test"].get("fingerprint") == fingerprint
    return not data_dir_given or Path(data_dir).resolve() == Path(checkpoint.config.data_dir).resolve()


def write_evaluation(checkpoint: Path, confusion: Tensor, names: list[str], tta: bool,
                     selection: str = "") -> tuple[Path, Path]:
    """Per-class errors and the confusion matrix (counts, true class by row) of an evaluation,
    beside the checkpoint and named after it (-tta with test-time augmentation; ``selection``
    names test images other than the run's own)."""
    suffix = selection + ("-tta" if tta else "")
    per_class = checkpoint.parent / f"{checkpoint.stem}-classes{suffix}.csv"
    matrix = checkpoint.parent / f"{checkpoint.stem}-confusion{suffix}.csv"
    for path in (per_class, matrix):  # both refused before either is written
        refuse_unless_regular(path)
    images = confusion.sum(1)
    per_class_rows = [["class", "name", "images", "errors", "error"]] + [
        [c, names[c], int(images[c]), int(images[c] - confusion[c, c]),
         f"{100 * (1 - confusion[c, c] / images[c]).item() if images[c] else 0:.4g}"]
        for c in range(len(names))]
    matrix_rows = [["true\\predicted", *names]] + [
        [names[c], *(int(v) for v in confusion[c])] for c in range(len(names))]
    with write_errors("free space or copy the checkpoint into a folder you can write to"):
        write_text(per_class, csv_text(per_class_rows))
        write_text(matrix, csv_text(matrix_rows))
    return per_class, matrix


def csv_text(rows: list[list]) -> str:
    """``rows`` as CSV, quoted where a field needs it (a class name with a comma)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()
