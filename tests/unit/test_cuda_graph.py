"""The CUDA-graph runner (cuda_graph.py): warm-up, one capture, replays; a failed capture goes
on eagerly; the first replay checked against an eager step; what can be captured. CUDA-only
checks carry ``cuda``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.runtime import Runtime, capture_cuda_graph
from densenet_trainer.speed import cuda_graph
from helpers import (
    ROOT,
    capture_without_update,
    faithful_capture,
    make_step,
    stale_capture,
    static_grads_capture,
    train_steps,
)


def test_graphed_step_warms_up_captures_once_and_replays(capsys):
    """The runner's order of calls, with a stand-in capture that returns the step itself: three
    eager steps, one capture, replays; the numbers are those of plain eager steps."""
    eager, graphed = make_step(torch.device("cpu")), make_step(torch.device("cpu"))
    captures = []

    def capture(step):
        captures.append(step)
        return step

    runner = cuda_graph.GraphedStep(graphed, print, capture=capture)
    reference = train_steps(eager, eager, 6)
    assert train_steps(graphed, runner, 6) == reference
    assert captures == [graphed] and runner.warmed == cuda_graph.GraphedStep.WARMUP
    for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert capsys.readouterr().out == ""


def test_a_failed_capture_goes_on_eagerly_with_one_notice(capsys):
    """Capture fails once (as an uncapturable op would): one notice naming the reason, no second
    attempt, and the run's numbers are the eager ones."""
    eager, graphed = make_step(torch.device("cpu")), make_step(torch.device("cpu"))
    attempts = []

    def failing_capture(step):
        attempts.append(1)
        for p in step.model.parameters():  # what a capture leaves behind: graph-pool gradients
            p.grad = torch.full_like(p, float("nan"))
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    runner = cuda_graph.GraphedStep(graphed, print, capture=failing_capture)
    assert train_steps(graphed, runner, 6) == train_steps(eager, eager, 6)
    assert attempts == [1]
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["notice: the training step could not be captured as a CUDA graph (CUDA error: "
                   "operation not permitted when stream is capturing); training goes on eagerly, "
                   "with the same kernels, slower"]


def test_the_graph_is_for_one_gpu_process():
    """A graph where the process can capture one (Runtime.alone on CUDA) and the run asks for
    it; several processes step eagerly and say so."""
    step = make_step(torch.device("cpu"))
    notices = []
    runner, graph, no_graph = cuda_graph.step_runner, RunConfig(), RunConfig(cuda_graph=False)
    assert Runtime.alone(torch.device("cpu")).capture is None
    assert Runtime.alone(torch.device("cuda")).capture is capture_cuda_graph
    assert runner(step, graph, "aten", Runtime.alone(torch.device("cpu")), notices.append) is step
    assert runner(step, no_graph, "aten", Runtime.alone(torch.device("cuda")), notices.append) is step
    graphed = runner(step, graph, "aten", Runtime.alone(torch.device("cuda")), notices.append)
    assert isinstance(graphed, cuda_graph.GraphedStep) and graphed.capture is capture_cuda_graph
    assert notices == []
    assert runner(step, graph, "aten", Runtime(torch.device("cuda"), 0, 2), notices.append) is step
    assert notices == ["notice: the training step runs eagerly, not as a CUDA graph: several "
                       "processes: DistributedDataParallel's all-reduce is not captured"]


CUDA = torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_cuda_graph_replays_the_eager_steps(precision, memory_efficient):
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        eager = make_step(CUDA, precision, memory_efficient)
        graphed = make_step(CUDA, precision, memory_efficient)
        runner = cuda_graph.GraphedStep(graphed, pytest.fail)
        expected, got = train_steps(eager, eager, 6), train_steps(graphed, runner, 6)
        assert runner.replay is not None
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    finally:
        torch.backends.cudnn.deterministic = False


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_after_two_replays_the_gradients_are_those_of_an_eager_step(precision):
    """A real capture: after the checked replay and two more, each p.grad is what the last
    replay wrote, equal to the gradients of an eager run's same step."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        eager, graphed = make_step(CUDA, precision), make_step(CUDA, precision)
        runner = cuda_graph.GraphedStep(graphed, pytest.fail)
        calls = cuda_graph.GraphedStep.CALLS_BEFORE_REPLAYS + 2
        train_steps(eager, eager, calls)
        train_steps(graphed, runner, calls)
        assert runner.checked, runner.status
        torch.cuda.synchronize()
        for p, q in zip(graphed.model.parameters(), eager.model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    finally:
        torch.backends.cudnn.deterministic = False


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_no_sync_inside_the_cuda_step(precision, memory_efficient):
    step = make_step(CUDA, precision, memory_efficient)
    step.start_epoch()
    step()  # first step: lazy state, cuDNN's choices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


UNCAPTURABLE = Path(__file__).resolve().parent / "uncapturable_step.py"
SCRIPT_PATH = os.pathsep.join([str(ROOT), str(ROOT / "tests")])  # pytest's pythonpath


@pytest.mark.slow
def test_the_uncapturable_script_resolves_every_name_it_uses():
    """The CUDA test's script, checked where there is no GPU: it is where the test runs it, and
    it imports (with the path the test gives it) every name it uses."""
    code = UNCAPTURABLE.read_text().split("step = make_step(")[0]  # its imports, before any CUDA
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": SCRIPT_PATH})
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.cuda
def test_an_uncapturable_step_falls_back_on_cuda():
    """A real capture failure (a host read inside the step), in a process of its own: on older
    torch a failed capture leaves the caching allocator unusable (pytorch#180395), and its
    memory pool stays until the process exits."""
    result = subprocess.run([sys.executable, str(UNCAPTURABLE)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": SCRIPT_PATH})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not be captured as a CUDA graph" in result.stdout
    assert result.stdout.strip().endswith("eager")


def test_a_replay_that_matches_is_trusted_and_changes_nothing(capsys):
    eager, graphed = make_step(torch.device("cpu")), make_step(torch.device("cpu"))
    runner = cuda_graph.GraphedStep(graphed, print, capture=faithful_capture)
    assert train_steps(graphed, runner, 6) == train_steps(eager, eager, 6)
    assert runner.checked and not runner.eager
    assert runner.status.startswith("graphed (captured in ") and runner.status.endswith(
        " s; its first replay matched an eager step)")
    for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert eager.optimizer.state_dict()["state"][0]["momentum_buffer"].equal(
        graphed.optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("capture, what", [(stale_capture, "the counters differ"),
                                           (capture_without_update, "weights and BatchNorm statistics off by")])
def test_a_replay_that_disagrees_is_dropped_and_the_run_is_the_eager_one(capture, what, capsys):
    """The stale replay trains on the wrong batch, the other skips the update: either is caught
    at the first replay, said once, and the run continues from the eager step's result."""
    eager, graphed = make_step(torch.device("cpu")), make_step(torch.device("cpu"))
    runner = cuda_graph.GraphedStep(graphed, print, capture=capture)
    assert train_steps(graphed, runner, 6) == train_steps(eager, eager, 6)
    assert runner.eager and runner.replay is None and not runner.checked
    for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values()):
        assert torch.equal(a, b)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(
        "notice: the CUDA graph's first replay disagreed with an eager step from the same state (")
    assert what in out[0] and what in runner.status


def test_replay_mismatch_tolerates_rounding_and_nothing_more():
    """Within REPLAY_RTOL of what the step changed: the order of sums may differ, a wrong
    update may not; counters must be equal, and NaN never agrees."""
    start = torch.linspace(-1, 1, 1000, dtype=torch.float32)
    eager = start + 1e-2 * torch.sin(torch.arange(1000.0))
    change = torch.linalg.vector_norm(eager - start).item()
    state = {"counters": [torch.tensor([5])], "weights": [eager]}

    def mismatch(weights, counter=5):
        return cuda_graph.replay_mismatch(state, [torch.tensor([4]), start],
                                        [torch.tensor([counter]), weights])

    noise = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    noise *= change / torch.linalg.vector_norm(noise)
    assert mismatch(eager) is None
    assert mismatch(eager + 1e-4 * noise) is None
    assert "weights off by" in mismatch(eager + 1e-2 * noise)
    assert "weights off by" in mismatch(start)  # no update at all
    assert mismatch(eager, counter=6) == "the counters differ"
    assert mismatch(torch.where(start > 0.5, float("nan"), eager)) is not None


@pytest.mark.parametrize("cfg, kernels, reason", [
    (RunConfig(opt="rmsprop", precision="fp16"), "fused",
     "fp16's gradient scaler reads its overflow flag on the host for RMSprop"),
    (RunConfig(memory_efficient=True, dropout=0.2), "aten",
     "--memory-efficient with dropout on the ATen path: checkpointing saves the CUDA random-number state"),
])
def test_a_step_that_cannot_be_captured_is_never_tried(cfg, kernels, reason):
    step = make_step(torch.device("cpu"))
    attempts, notices = [], []
    runtime = Runtime(torch.device("cpu"), capture=attempts.append)
    assert cuda_graph.step_runner(step, cfg, kernels, runtime, notices.append) is step
    assert attempts == [] and len(notices) == 1
    assert notices[0].startswith(f"notice: the training step runs eagerly, not as a CUDA graph: {reason}")


def test_what_can_be_captured_is():
    runtime = Runtime(torch.device("cpu"), capture=faithful_capture)
    step = make_step(torch.device("cpu"))
    for cfg, kernels in [(RunConfig(opt="adam", precision="fp16"), "aten"),
                         (RunConfig(opt="rmsprop", precision="bf16"), "aten"),
                         (RunConfig(memory_efficient=True, dropout=0.2), "fused"),
                         (RunConfig(memory_efficient=True), "aten")]:
        assert isinstance(cuda_graph.step_runner(step, cfg, kernels, runtime, pytest.fail),
                          cuda_graph.GraphedStep)


def test_after_the_check_the_gradients_are_the_graphs():
    """The checked replay's eager step leaves its gradients in fresh tensors; once the graph
    is trusted, each p.grad is again the tensor the replays write, holding that step's values."""
    captured = []

    def capture(step):
        captured.append(static_grads_capture(step))
        return captured[0]
    graphed, eager = make_step(torch.device("cpu")), make_step(torch.device("cpu"))
    runner = cuda_graph.GraphedStep(graphed, print, capture=capture)
    train_steps(graphed, runner, cuda_graph.GraphedStep.CALLS_BEFORE_REPLAYS)
    train_steps(eager, eager, cuda_graph.GraphedStep.CALLS_BEFORE_REPLAYS)
    assert runner.checked, runner.status
    parameters = [p for group in graphed.optimizer.param_groups for p in group["params"]]
    kept = captured[0].kept
    assert all(p.grad is kept[p] for p in parameters)
    eager_parameters = [p for group in eager.optimizer.param_groups for p in group["params"]]
    for p, q in zip(parameters, eager_parameters):  # the last (eager) step's gradients
        assert torch.equal(p.grad, q.grad)
