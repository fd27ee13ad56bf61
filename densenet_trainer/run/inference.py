"""A trained model for inference, from its checkpoint: train.py --evaluate (``evaluate_checkpoint``)
and attic/predict.py classify with it; and the files an evaluation writes beside it."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from densenet import DenseNet
from densenet_trainer.config.cli import UserError
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.data import datasets, loader
from densenet_trainer.loop import evaluation
from densenet_trainer.run.build import build_model
from densenet_trainer.run.checkpoint import Checkpoint, restore
from densenet_trainer.run.files import WorkDirLock, write_errors
from densenet_trainer.runtime import setup_runtime
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


# ---------------------------------------------------------------- --evaluate

EVALUATE_READS = frozenset({"data_dir", "download", "test_subset", "device", "eval_batch_size"})  # all else: the run's


def first_of(subset: int | None, images: int) -> int | None:
    """The test images a --test-subset takes of ``images``: its first ``subset``, or None for all
    of them (no subset, or one as large as the split)."""
    return subset if subset and subset < images else None


def evaluate_checkpoint(path: Path, cfg: RunConfig, given: frozenset[str], tta: bool) -> int:
    """train.py --evaluate: the test error of a checkpoint (file, or a run's directory); per-class
    errors and the confusion matrix go to CSV files beside it.

    The data comes from where the run was trained, unless --data-dir (or --download) says
    otherwise; the test images are those the run was tested on (its --test-subset) unless
    --test-subset says otherwise, and then the result files are named after that selection,
    beside the run's own; --eval-batch-size is this command's.
    """
    checkpoint = Checkpoint.load(path)
    with WorkDirLock(checkpoint.path.parent, "copy the checkpoint into a folder of your own and "
                                             "evaluate it there") as lock:
        lock.acquire()  # the results go beside the checkpoint: refuse now, not after evaluating
        runtime = setup_runtime(cfg.device)
        trained = load_trained(checkpoint, runtime.device)
        trained_cfg = trained.config  # the run's; cfg is this command's
        dataset = datasets.load_dataset(trained_cfg.dataset, cfg.data_dir if "data_dir" in given else trained_cfg.data_dir,
                                    cfg.download if "download" in given else trained_cfg.download,
                                    svhn_extra=False)
        subset = first_of(cfg.test_subset if "test_subset" in given else trained_cfg.test_subset, len(dataset.test))
        test = dataset.test.first(subset) if subset else dataset.test
        batches = loader.EvalBatches(test.to(runtime.device), cfg.eval_batch_size,
                                   trained.normalizer, runtime.device,
                                   channels_last=trained_cfg.channels_last)
        result = evaluation.evaluate(trained.model, batches, trained_cfg.precision, runtime,
                                   trained_cfg.num_classes, tta=tta)
        if not math.isfinite(result.loss):  # finite weights whose outputs overflow
            raise UserError(f"{checkpoint.path} gives outputs that are not finite on the "
                            f"{result.images} test images (its loss is {result.loss}): an error "
                            f"rate of it would mean nothing; use an earlier checkpoint")
        names = dataset.classes or [str(c) for c in range(trained_cfg.num_classes)]
        own_subset = first_of(trained_cfg.test_subset, len(dataset.test))
        own = dataset.test.first(own_subset) if own_subset else dataset.test
        selection = ((f"-test{subset or 'all'}" if subset != own_subset else "")
                     + ("" if runs_own_test(checkpoint, own.fingerprint(), cfg.data_dir, "data_dir" in given)
                        else f"-data{test.fingerprint()[:8]}"))
        per_class, matrix = write_evaluation(checkpoint.path, result.confusion, names, tta, selection)
    print(f"{checkpoint.path} after epoch {checkpoint.epoch}: test error {result.error:.2f}% "
          + (f"(top-5 {result.top5_error:.2f}%) " if result.top5_error is not None else "")
          + f"(loss {result.loss:.4f}) on {result.images} images"
          + (f" (the test set's first {subset}: --test-subset {subset}"
             f"{'' if 'test_subset' in given else ', as the run was tested'})" if subset else "")
          + (" with flip test-time augmentation" if tta else "")
          + (f" (not the images the run was tested on: the files are named {selection})"
             if "-data" in selection else ""))
    print(f"per-class errors: {per_class}\nconfusion matrix: {matrix}")
    return 0
