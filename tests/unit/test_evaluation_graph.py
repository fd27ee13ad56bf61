"""Evaluation as replays of one CUDA graph (cuda_graph.GraphedEvaluation): batch 0 eager, one
capture, its first replay checked; a failed capture or a disagreeing replay goes on eagerly;
the numbers are always the eager ones. Stand-in captures here; the real one carries ``cuda``."""
from __future__ import annotations

import pytest
import torch

from densenet import DenseNet
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.data import datasets, loader
from densenet_trainer.loop import evaluation, training
from densenet_trainer.runtime import Runtime, capture_cuda_graph
from densenet_trainer.speed import cuda_graph
from densenet_trainer.speed.precision import precision_of
from helpers import densenet

CPU = torch.device("cpu")


def split(count: int = 37, device: torch.device = CPU) -> datasets.Split:
    generator = torch.Generator().manual_seed(0)
    return datasets.Split(torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator),
                          torch.randint(0, 10, (count,), generator=generator)).to(device)


def evaluations(capture, device: torch.device = CPU, precision: str = "fp32", kernels: str = "aten",
                notices: list | None = None) -> tuple[DenseNet, evaluation.EagerEvaluation, cuda_graph.GraphedEvaluation]:
    """One tiny model evaluated two ways over 37 images in batches of 16 (the last padded)."""
    torch.manual_seed(0)
    model = densenet(kernels, depth=10, growth_rate=4).to(device, memory_format=torch.channels_last)
    batches = loader.EvalBatches(split(device=device), 16, loader.Normalizer([0.5] * 3, [0.25] * 3, device), device,
                               channels_last=True)
    eager = evaluation.EagerEvaluation(evaluation.EvaluationSums(model, precision_of(model, precision), 10, device), batches)
    graphed = cuda_graph.GraphedEvaluation(evaluation.EvaluationSums(model, precision_of(model, precision), 10, device), batches,
                                           (notices if notices is not None else []).append, capture)
    return model, eager, graphed


def same(a: evaluation.Evaluation, b: evaluation.Evaluation) -> bool:
    return a.loss == pytest.approx(b.loss, rel=1e-6) and torch.equal(a.confusion, b.confusion)


def faithful(work):
    """A capture whose replay is the work itself."""
    return work


def stale(work):
    """A capture whose replay evaluates the batch it was captured at, over and over."""
    runner = work.__self__
    captured_at = int(runner.index)

    def replay():
        runner.index.fill_(captured_at)
        work()
    return replay


def test_replays_give_the_eager_numbers_with_the_weights_of_the_moment():
    captures, notices = [], []
    model, eager, graphed = evaluations(lambda work: captures.append(work) or work, notices=notices)
    runtime = Runtime(CPU)
    for _ in range(2):
        assert same(evaluation.read_evaluation(graphed, runtime), evaluation.read_evaluation(eager, runtime))
        with torch.no_grad():  # training moves the weights in place between evaluations
            model.stem.weight.mul_(1.5)
    assert len(captures) == 1 and notices == []
    assert graphed.status.startswith("graphed (captured in ") and graphed.status.endswith(
        " s; its first replay matched an eager batch)")


@pytest.mark.parametrize("capture, why", [
    (stale, "its first replay's logits differ from an eager batch's by "),
    (lambda work: (_ for _ in ()).throw(RuntimeError("operation not permitted when stream is capturing")),
     "the capture failed (operation not permitted when stream is capturing)")])
def test_a_graph_that_fails_or_disagrees_leaves_evaluation_eager(capture, why):
    """The stale graph replays batch 1 where batch 0 was asked for: caught at its first
    replay. Either way one notice, and every evaluation's numbers are the eager ones."""
    notices = []
    _, eager, graphed = evaluations(capture, notices=notices)
    runtime = Runtime(CPU)
    for _ in range(2):
        assert same(evaluation.read_evaluation(graphed, runtime), evaluation.read_evaluation(eager, runtime))
    assert len(notices) == 1 and notices[0].startswith(f"notice: evaluation runs eagerly, not as a CUDA graph: {why}")
    assert graphed.eager and graphed.status.startswith(f"eager: {why}")


def test_a_replay_that_counts_nothing_is_caught_by_the_image_count():
    """A graph that replays nothing passes the logits check (batch 0's are the eager ones)
    but leaves 21 of the 37 images uncounted: the evaluation refuses to report."""
    _, _, graphed = evaluations(lambda work: lambda: None)
    with pytest.raises(training.StepCheckFailed, match=r"the evaluation counted 16 images of the split's 37 \(graphed"):
        evaluation.read_evaluation(graphed, Runtime(CPU))


def test_what_evaluates_a_split():
    """Replays where the process captures and the run allows; else eager, and why."""
    _, eager, _ = evaluations(faithful)
    sums, batches = eager.sums, eager.batches
    stand_in = Runtime(CPU, capture=faithful)
    runner = cuda_graph.evaluation_runner
    assert isinstance(runner(sums, batches, RunConfig(), stand_in, print), cuda_graph.GraphedEvaluation)
    assert Runtime.alone(torch.device("cuda")).capture is capture_cuda_graph
    for cfg, runtime, status in [
            (RunConfig(), Runtime(CPU), "eager (CUDA graphs are for GPUs; this runs on cpu)"),
            (RunConfig(cuda_graph=False), stand_in, "eager (--no-cuda-graph)"),
            (RunConfig(kernels="compile"), stand_in, "eager (torch.compile compiles the model again for evaluation"),
            (RunConfig(), Runtime(CPU, 0, 2), "eager (several processes")]:
        evaluated = runner(sums, batches, cfg, runtime, pytest.fail)
        assert isinstance(evaluated, evaluation.EagerEvaluation) and evaluated.status.startswith(status)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kernels", ["aten", "fused"])
def test_real_graphs_evaluate_as_eagerly(precision, kernels):
    """Two splits' graphs, made as a run makes them (one memory pool for both), replayed in
    turn as epochs do, with the weights moving between evaluations."""
    cuda = torch.device("cuda")
    notices = []
    model, eager, _ = evaluations(faithful, cuda, precision, kernels)
    runtime = Runtime.alone(cuda)
    other = loader.EvalBatches(split(21, cuda), 16, eager.batches.normalizer, cuda, channels_last=True)

    def sums() -> evaluation.EvaluationSums:
        return evaluation.EvaluationSums(model, precision_of(model, precision), 10, cuda)
    pairs = [(evaluation.EagerEvaluation(sums(), batches),
              cuda_graph.evaluation_runner(sums(), batches, RunConfig(), runtime, notices.append))
             for batches in (eager.batches, other)]
    for _ in range(2):
        for reference, graphed in pairs:
            got, expected = evaluation.read_evaluation(graphed, runtime), evaluation.read_evaluation(reference, runtime)
            assert got.loss == pytest.approx(expected.loss, rel=1e-4)
            assert (got.confusion - expected.confusion).abs().sum() <= 2  # an argmax tie at most
        with torch.no_grad():
            model.stem.weight.mul_(1.5)
    assert notices == [] and all(graphed.status.startswith("graphed") for _, graphed in pairs)
