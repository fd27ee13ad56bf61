"""The loop over an epoch's steps and evaluation (loop/training.py, loop/evaluation.py): the epoch's check of its steps,
evaluation's fixed shapes."""
from __future__ import annotations

import pytest
import torch

from densenet import DenseNet
from densenet_trainer.data import datasets, loader
from densenet_trainer.loop import evaluation, progress, training
from densenet_trainer.runtime import Runtime
from helpers import make_step


def test_the_epoch_check_counts_steps_losses_and_batchnorm_batches():
    step = make_step(torch.device("cpu"))
    step.model.train()
    step.start_epoch()
    for _ in range(3):
        step()
    training.check_epoch(step, 0, 3, 1)  # all as it should be
    norms = len(step.norms)
    with pytest.raises(training.StepCheckFailed) as raised:
        training.check_epoch(step, 0, 4, 1)  # a fourth step that never ran
    assert str(raised.value) == (
        f"epoch 1 did not train the steps it ran: the batch counter is at 3, not 4; 1 of its 4 "
        f"steps wrote no loss; the BatchNorm layers counted {3 * norms} batches, not "
        f"{4 * norms} ({norms} layers x 4 steps)")
    step.norms[2].num_batches_tracked -= 1  # a replay that skipped one layer's statistics
    with pytest.raises(training.StepCheckFailed, match=f"counted {3 * norms - 1} batches, not {3 * norms}"):
        training.check_epoch(step, 0, 3, 1)


def test_evaluation_pads_to_one_shape_and_counts_only_real_images():
    """Any evaluation batch size gives the same loss, error and confusion matrix."""
    torch.manual_seed(0)
    model = DenseNet(10, 4)
    split = datasets.Split(torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8),
                       torch.randint(0, 10, (37,)))
    normalizer = loader.Normalizer([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    runtime = Runtime(torch.device("cpu"))
    shapes = {tuple(images.shape) for images, _, _ in loader.EvalBatches(split, 16, normalizer, runtime.device)}
    assert shapes == {(16, 3, 32, 32)}
    results = [evaluation.evaluate(model, loader.EvalBatches(split, size, normalizer, runtime.device),
                                 "fp32", runtime, 10) for size in (1, 16, 37, 500)]
    first = results[0]
    for result in results[1:]:
        assert result.top5_error is None  # ten classes
        assert result.loss == pytest.approx(first.loss, rel=1e-5) and result.error == first.error
        assert torch.equal(result.confusion, first.confusion) and result.images == 37


def test_evaluation_batches_copy_nothing_from_the_host():
    """Each evaluation batch's indices and mask are made where the data is: no copy from
    another device per batch (on a GPU, a wait for the host each time). The data on the meta
    device stands for a GPU's; every copy between devices is counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CrossDeviceCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copies = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].device != out.device:
                self.copies.append((args[0].device, out.device))
            return out

    meta = torch.device("meta")
    split = datasets.Split(torch.empty(37, 3, 32, 32, dtype=torch.uint8, device=meta),
                           torch.empty(37, dtype=torch.int64, device=meta))
    normalizer = loader.Normalizer([0.5] * 3, [0.25] * 3, meta)
    with CrossDeviceCopies() as counted:
        batches = list(loader.EvalBatches(split, 16, normalizer, meta))
    assert len(batches) == 3 and counted.copies == []


@pytest.mark.parametrize("classes, tta", [(10, False), (100, True)])
def test_evaluation_never_waits_for_the_host_inside_its_loop(classes, tta):
    """Every batch's forward, loss, confusion counts and top-5 hits on the meta device, where
    any read by the host (an .item(), a bincount's maximum, a mask's nonzero) would fail."""
    meta = torch.device("meta")
    model = DenseNet(10, 4, num_classes=classes).to(meta, memory_format=torch.channels_last)
    split = datasets.Split(torch.empty(37, 3, 32, 32, dtype=torch.uint8, device=meta),
                           torch.empty(37, dtype=torch.int64, device=meta))
    batches = loader.EvalBatches(split, 16, loader.Normalizer([0.5] * 3, [0.25] * 3, meta), meta)
    sums = evaluation.EvaluationSums(model, training.Autocast(model, "fp32"), classes, meta, tta)
    with torch.inference_mode():
        evaluation.EagerEvaluation(sums, batches)()
    assert sums.confusion.shape == (classes * classes,) and sums.loss_sum.device == sums.hits5.device == meta


def test_the_progress_bar_says_when_the_run_ends():
    """On a terminal, tqdm's bar gives the epoch's time left and, beside it, the run's."""
    bar = progress.ProgressBar(1, 3, 5, 0)
    bar.show(2, 2.3, 90.0, 100.0, 2.0)  # 1 s a step: 3 s left in the epoch, 13 s in the run
    assert "run_ends_in=13 s" in bar.bar.postfix
    last = progress.ProgressBar(3, 3, 5, 0)
    last.show(2, 2.3, 90.0, 100.0, 2.0)
    assert "run_ends_in" not in last.bar.postfix  # the epoch's own time is the run's
    bar.close()
    last.close()
