"""The step checks itself (step.py, training.py): the CUDA graph's first replay against an eager step,
each epoch's bookkeeping, the configurations never captured; config.json's record of how the
run ran. On the CPU the graph is a stand-in capture that replays right or wrong."""
from __future__ import annotations

import json

import pytest
import torch
from test_step import make_step, train_steps

import train
from conftest import TINY, metrics
from densenet_trainer.engine import cuda_graph, training
from densenet_trainer.engine.runtime import Runtime
from densenet_trainer.engine.step import LearningRate
from densenet_trainer.run import build, kernel_choice
from densenet_trainer.run.checkpoint import Checkpoint, restore
from densenet_trainer.settings.cli import UserError
from densenet_trainer.settings.config import RunConfig


def right(step):
    """A capture whose replay is the step."""
    return step


def stale(step):
    """A capture whose replay trains on the batch it was captured at, over and over."""
    captured_at = int(step.batch_index)

    def replay():
        step.batch_index.fill_(captured_at)
        step()
    return replay


def no_update(step):
    """A capture whose replay computes the loss but leaves the weights where they were."""
    def replay():
        weights = [p.detach().clone() for p in step.model.parameters()]
        step()
        with torch.no_grad():
            for p, w in zip(step.model.parameters(), weights):
                p.copy_(w)
    return replay


def flags(tmp_path, cifar_dir, name: str, *more: str) -> RunConfig:
    argv = ["--data-dir", str(cifar_dir), *TINY, "--batch-size", "16", "--epochs", "2",
            "--save", str(tmp_path / name), *more]
    return RunConfig.from_flags(train.build_parser().parse_args(argv))[0]


# ---------------------------------------------------------------- the first replay

def test_a_replay_that_matches_is_trusted_and_changes_nothing(capsys):
    eager, graphed = make_step(torch.device("cpu")), make_step(torch.device("cpu"))
    runner = cuda_graph.GraphedStep(graphed, print, capture=right)
    assert train_steps(graphed, runner, 6) == train_steps(eager, eager, 6)
    assert runner.checked and not runner.eager
    assert runner.status == "graphed (its first replay matched an eager step)"
    for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert eager.optimizer.state_dict()["state"][0]["momentum_buffer"].equal(
        graphed.optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("capture, what", [(stale, "the counters differ"),
                                           (no_update, "weights and BatchNorm statistics off by")])
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


# ---------------------------------------------------------------- each epoch

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


def test_a_graph_that_goes_wrong_later_stops_the_run_before_the_epoch_is_saved(tmp_path, cifar_dir):
    """Replays that pass the first check and then stop training (a stand-in for a graph gone
    stale): the epoch's check stops the run with no row and no checkpoint for that epoch."""
    def later_nothing(step):
        calls = []

        def replay():
            calls.append(1)
            if len(calls) == 1:
                step()
        return replay

    cfg = flags(tmp_path, cifar_dir, "run")
    with pytest.raises(training.StepCheckFailed, match="epoch 1 did not train the steps it ran: "
                                                       "the batch counter is at 5, not 10"):
        train.train(cfg, runtime=Runtime(torch.device("cpu"), capture=later_nothing))
    assert (tmp_path / "run" / "train.csv").read_text().count("\n") == 1  # the header alone
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------- never captured

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
    runtime = Runtime(torch.device("cpu"), capture=right)
    step = make_step(torch.device("cpu"))
    for cfg, kernels in [(RunConfig(opt="adam", precision="fp16"), "aten"),
                         (RunConfig(opt="rmsprop", precision="bf16"), "aten"),
                         (RunConfig(memory_efficient=True, dropout=0.2), "fused"),
                         (RunConfig(memory_efficient=True), "aten")]:
        assert isinstance(cuda_graph.step_runner(step, cfg, kernels, runtime, pytest.fail),
                          cuda_graph.GraphedStep)


# ---------------------------------------------------------------- fixes

def test_fused_kernels_are_never_used_under_syncbatchnorm():
    """SyncBatchNorm's statistics are synchronised in its forward, which the fused kernels do
    not call: auto takes ATen there, and naming fused is refused."""
    two = Runtime(torch.device("cpu"), 0, 2)
    assert kernel_choice.choose_kernels(RunConfig(sync_bn=True), two).kernels == "aten"
    assert kernel_choice.choose_kernels(RunConfig(sync_bn=True), Runtime.alone(torch.device("cpu"))).kernels == "fused"
    assert kernel_choice.choose_kernels(RunConfig(kernels="fused"), two).kernels == "fused"
    with pytest.raises(UserError, match="--kernels fused normalises with each process's own batch "
                                        "statistics, not --sync-bn's"):
        kernel_choice.choose_kernels(RunConfig(sync_bn=True, kernels="fused"), two)


@pytest.mark.parametrize("opt", ["adam", "rmsprop"])
def test_step_counts_move_to_where_the_resumed_optimiser_reads_them(opt):
    """Trained without the graph (RMSprop keeps its step counts on the CPU then) and resumed
    with it, on a GPU (the meta device stands in): the counts move to the parameters' device,
    where a capturable optimiser reads them; a resume without the graph keeps them as its
    implementation reads them."""
    cfg = RunConfig(opt=opt)
    trained = build.build_optimizer(cfg, model := torch.nn.Linear(3, 2), LearningRate(cfg.lr, torch.device("cpu")))
    model(torch.ones(1, 3)).sum().backward()
    trained.step()
    kind = torch.optim.Adam if opt == "adam" else torch.optim.RMSprop
    graphed = kind(torch.nn.Linear(3, 2, device="meta").parameters(), capturable=True)
    restore(graphed, trained.state_dict(), "checkpoint.pt")
    assert graphed.param_groups[0]["capturable"]
    assert [s["step"].device.type for s in graphed.state.values()] == ["meta", "meta"]
    eager = build.build_optimizer(cfg, torch.nn.Linear(3, 2), LearningRate(cfg.lr, torch.device("cpu")))
    restore(eager, trained.state_dict(), "checkpoint.pt")
    assert [s["step"].dtype for s in eager.state.values()] == [torch.float32] * 2


# ---------------------------------------------------------------- the fused kernels' self-test

class Broken:
    """The CPU kernels with one fault: a wrong result, or an error as a missing compiler or a
    failed launch would raise."""

    def __init__(self, fault: str) -> None:
        from densenet_trainer.kernels import cpu_kernels
        self.kernels, self.fault, self.DTYPES = cpu_kernels, fault, cpu_kernels.DTYPES

    def norm_relu(self, *args):
        if self.fault == "error":
            raise RuntimeError("Triton launcher: Python.h: No such file or directory")
        self.kernels.norm_relu(*args)

    def norm_relu_backward(self, *args):
        return self.kernels.norm_relu_backward(*args)

    def stats(self, f, f_stride, P, C, dst, dst_stride, mean, var):
        self.kernels.stats(f, f_stride, P, C, dst, dst_stride, mean, var)
        if self.fault == "tail" and C > 32:
            var[32:] *= 1.01  # a channel tail's variance a little off

    def finish_grad(self, *args):
        return self.kernels.finish_grad(*args)


@pytest.fixture
def broken(monkeypatch):
    """fused.py's kernels on the CPU replaced by a faulty set; the self-test's memo cleared."""
    from densenet_trainer.kernels import fused, kernel_check

    def use(fault: str) -> None:
        monkeypatch.setattr(fused, "backend", lambda device_type: Broken(fault))
        kernel_check.failure.cache_clear()
    yield use
    kernel_check.failure.cache_clear()


def test_the_cpu_kernels_pass_their_self_test():
    from densenet_trainer.kernels import kernel_check
    assert kernel_check.check(torch.device("cpu")) is None


@pytest.mark.parametrize("fault, reason", [
    ("error", "the kernels in torch.float32: RuntimeError: Triton launcher: Python.h: No such file"),
    ("tail", "the kernels in torch.float32: stats' variance: Tensor-likes are not close!")])
def test_a_kernel_that_fails_its_self_test_is_not_used(broken, fault, reason, tmp_path, cifar_dir, capsys):
    """One warning, ATen's kernels, and config.json says why; the run's numbers are ATen's."""
    from densenet_trainer.kernels import kernel_check
    broken(fault)
    assert kernel_check.check(torch.device("cpu")).startswith(reason)
    assert train.train(flags(tmp_path, cifar_dir, "broken")) == 0
    out = capsys.readouterr().out
    assert out.count("warning: the fused kernels failed their self-test on cpu (") == 1
    record = json.loads((tmp_path / "broken" / "config.json").read_text())
    assert record["kernels_used"] == "aten on cpu"
    assert record["kernels_chosen"]["why"].startswith(
        f"--kernels auto on cpu, but the fused kernels failed their self-test ({reason}")
    assert train.train(flags(tmp_path, cifar_dir, "aten", "--kernels", "aten")) == 0
    assert metrics(tmp_path / "broken") == metrics(tmp_path / "aten")


# ---------------------------------------------------------------- --kernels auto on a GPU

def fake_timings(**ms):
    calls = []

    def measure(kernels: str) -> float:
        calls.append(kernels)
        return ms[kernels] / 1e3
    return measure, calls


@pytest.fixture
def gpu_kernels_pass(monkeypatch):
    """The fused CUDA kernels as if they had passed their self-test on a GPU."""
    from densenet_trainer.kernels import kernel_check
    monkeypatch.setattr(kernel_check, "failure", lambda device_type: None)


@pytest.mark.parametrize("aten, fused_ms, chosen", [(3.0, 2.0, "fused"), (2.5, 2.6, "aten")])
def test_auto_on_a_gpu_takes_the_faster_kernels_and_records_why(gpu_kernels_pass, aten, fused_ms,
                                                                chosen, capsys):
    measure, calls = fake_timings(aten=aten, fused=fused_ms)
    choice = kernel_choice.choose_kernels(RunConfig(), Runtime(torch.device("cuda")), print, None, measure)
    assert calls == ["aten", "fused"]
    assert choice == kernel_choice.KernelChoice(chosen, "auto: the faster over 5 timed steps each",
                                        {"aten": aten, "fused": fused_ms})
    assert capsys.readouterr().out == (f"--kernels auto: {chosen} (aten {aten:.2f} ms, fused "
                                       f"{fused_ms:.2f} ms per step)\n")
    assert choice.record() == {"kernels": chosen, "why": "auto: the faster over 5 timed steps each",
                               "ms_per_step": {"aten": aten, "fused": fused_ms}}


def test_auto_on_a_gpu_keeps_a_resumed_runs_choice_and_times_only_what_can_run(gpu_kernels_pass):
    gpu, never = Runtime(torch.device("cuda")), fake_timings()[0]
    saved = {"device_type": "cuda", "kernels": "fused"}
    assert kernel_choice.choose_kernels(RunConfig(), gpu, print, saved, never) == kernel_choice.KernelChoice(
        "fused", "auto, kept from the run's first start")
    # a run trained on the CPU and resumed on a GPU chooses afresh
    measure, calls = fake_timings(aten=1.0, fused=2.0)
    assert kernel_choice.choose_kernels(RunConfig(), gpu, print, {"device_type": "cpu", "kernels": "fused"},
                                measure).kernels == "aten"
    # the fused kernels do not compute in fp16: nothing to time
    assert kernel_choice.choose_kernels(RunConfig(precision="fp16"), gpu, print, None, never) == kernel_choice.KernelChoice(
        "aten", "auto: the fused kernels do not compute in fp16")


def test_timing_steps_changes_nothing_the_run_draws():
    """time_steps builds and steps a run of its own: the global generators are as they were."""
    import random

    import numpy as np
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    cfg = RunConfig(depth=10, growth_rate=4, batch_size=8)
    seconds = kernel_choice.time_steps(cfg, Runtime(torch.device("cpu")), "aten")
    assert seconds > 0
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert (np.random.get_state()[1] == state[2]).all()


def test_a_checkpoint_keeps_the_kernels_it_trained_with(tmp_path, cifar_dir):
    assert train.train(flags(tmp_path, cifar_dir, "run")) == 0
    state = Checkpoint.load(tmp_path / "run").state
    assert state["kernels"] == {"device_type": "cpu", "kernels": "fused"}


# ---------------------------------------------------------------- what config.json says

def test_config_json_tells_how_the_steps_ran(tmp_path, cifar_dir, capsys):
    cpu = Runtime(torch.device("cpu"))
    for name, runtime, status in [
            ("eager", cpu, "eager (CUDA graphs are for GPUs; this runs on cpu)"),
            ("graphed", Runtime(torch.device("cpu"), capture=right),
             "graphed (its first replay matched an eager step)"),
            ("dropped", Runtime(torch.device("cpu"), capture=stale),
             "eager: the graph's first replay disagreed with an eager step (the counters differ)")]:
        assert train.train(flags(tmp_path, cifar_dir, name), runtime=runtime) == 0
        record = json.loads((tmp_path / name / "config.json").read_text())
        assert record["step"].startswith(status)
        assert record["kernels_used"] == "fused on cpu"
        assert record["environment"]["device"] == "cpu" and "gpu" not in record["environment"]
    assert metrics(tmp_path / "graphed") == metrics(tmp_path / "eager") == metrics(tmp_path / "dropped")
    # a resume records how its own steps ran
    assert train.main(["--resume", "--save", str(tmp_path / "graphed"), "--epochs", "3",
                       "--no-cuda-graph"]) == 0
    record = json.loads((tmp_path / "graphed" / "config.json").read_text())
    assert record["step"].startswith("graphed") and record["resumes"][-1]["step"] == "eager (--no-cuda-graph)"


@pytest.mark.cuda
def test_on_a_gpu_the_run_checks_itself_and_says_what_ran(tmp_path, cifar_dir):
    """--kernels auto times both kernel sets, the graph's first replay matches, and config.json
    names the GPU and the versions it ran with."""
    assert train.main(["--data-dir", str(cifar_dir), *TINY, "--device", "cuda", "--epochs", "1",
                       "--save", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["step"] == "graphed (its first replay matched an eager step)"
    assert set(record["kernels_chosen"]["ms_per_step"]) == {"aten", "fused"}
    assert {"gpu", "gpu_memory_gib", "cuda", "cudnn", "triton"} <= set(record["environment"])
