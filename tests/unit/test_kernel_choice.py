"""The kernel choice (kernel_choice.py): never fused under SyncBatchNorm, --kernels auto on a
GPU takes the faster and records why, keeps a resumed run's choice, and its timing changes
nothing the run draws."""
from __future__ import annotations

import pytest
import torch

from densenet_trainer.config.cli import UserError
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.run import build
from densenet_trainer.runtime import Runtime
from densenet_trainer.speed import kernel_choice
from helpers import faithful_capture, stale_capture


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


def fake_timings(**ms):
    calls = []

    def measure(kernels: str) -> float:
        calls.append(kernels)
        return ms[kernels] / 1e3
    return measure, calls


@pytest.fixture
def gpu_kernels_pass(monkeypatch):
    """The fused CUDA kernels and the GEMMs as if they had passed their self-tests on a GPU."""
    from densenet_trainer.speed import fused_gemm, gemm_kernels, kernel_check
    monkeypatch.setattr(kernel_check, "failure", lambda device_type: None)
    monkeypatch.setattr(kernel_check, "gemm_failure", lambda device_type: None)
    monkeypatch.setattr(fused_gemm, "backend", lambda device_type: gemm_kernels if device_type == "cuda" else None)


@pytest.mark.parametrize("aten, fused_ms, gemm_ms, chosen", [(3.0, 2.0, 2.5, "fused"), (2.5, 2.6, 2.7, "aten"),
                                                             (3.0, 2.0, 1.5, "fused-gemm")])
def test_auto_on_a_gpu_takes_the_fastest_kernels_and_records_why(gpu_kernels_pass, aten, fused_ms, gemm_ms,
                                                                 chosen, capsys):
    measure, calls = fake_timings(aten=aten, fused=fused_ms, **{"fused-gemm": gemm_ms})
    choice = kernel_choice.choose_kernels(RunConfig(), Runtime(torch.device("cuda")), print, None, measure)
    assert calls == ["aten", "fused", "fused-gemm"]
    why = "auto: the fastest of the best of 3 repeats of 5 timed steps each, after 3 untimed"
    ms = {"aten": aten, "fused": fused_ms, "fused-gemm": gemm_ms}
    assert (choice.kernels, choice.why, choice.ms_per_step, choice.problems) == (chosen, why, ms, None)
    assert capsys.readouterr().out == (f"--kernels auto: {chosen} (aten {aten:.2f} ms, fused "
                                       f"{fused_ms:.2f} ms, fused-gemm {gemm_ms:.2f} ms per step); choosing "
                                       f"took {choice.seconds:.1f} s\n")
    assert choice.record() == {"kernels": chosen, "why": why, "ms_per_step": ms, "seconds": choice.seconds}


def test_the_gemms_are_a_candidate_only_where_they_can_compute_the_run(gpu_kernels_pass, monkeypatch, capsys):
    """Not for a DenseNet without bottlenecks, nor where their self-test failed (said once, as a
    warning); --kernels fused-gemm there, and on the CPU, computes with the fused kernels and says why."""
    from densenet_trainer.speed import kernel_check
    gpu = Runtime(torch.device("cuda"))
    plain = RunConfig(bottleneck=False, compression=1.0, depth=40)
    measure, calls = fake_timings(aten=2.0, fused=1.0)
    assert kernel_choice.choose_kernels(plain, gpu, print, None, measure).kernels == "fused"
    assert calls == ["aten", "fused"]
    assert kernel_choice.choose_kernels(RunConfig(depth=40, bottleneck=False, compression=1.0, kernels="fused-gemm"),
                                        gpu) == kernel_choice.KernelChoice(
        "fused", "--kernels fused-gemm on cuda, but the GEMMs are DenseNet-BC's 1x1 convolutions, and this "
                 "DenseNet has none")
    capsys.readouterr()
    assert kernel_choice.choose_kernels(RunConfig(kernels="fused-gemm"), Runtime(torch.device("cpu"))) == \
        kernel_choice.KernelChoice("fused", "--kernels fused-gemm on cpu, but the GEMM kernels are unavailable "
                                            "on cpu (Triton, on CUDA only)")
    assert capsys.readouterr().out == ("notice: --kernels fused-gemm computes as --kernels fused here: the GEMM "
                                       "kernels are unavailable on cpu (Triton, on CUDA only)\n")
    assert kernel_choice.choose_kernels(RunConfig(kernels="fused-gemm"), gpu).kernels == "fused-gemm"
    capsys.readouterr()
    monkeypatch.setattr(kernel_check, "gemm_failure", lambda device_type: "a block: off by 3")
    measure, calls = fake_timings(aten=2.0, fused=1.0)
    assert kernel_choice.choose_kernels(RunConfig(), gpu, print, None, measure).kernels == "fused"
    assert calls == ["aten", "fused"]
    assert capsys.readouterr().out.startswith("warning: the GEMM kernels failed their self-test on cuda "
                                              "(a block: off by 3); the run's 1x1 convolutions are cuDNN's instead\n")


@pytest.mark.parametrize("failing", [["fused"], ["aten", "fused", "fused-gemm"]])
def test_a_candidate_that_fails_loses_saying_why(gpu_kernels_pass, failing, capsys):
    """An exception in a candidate (Triton, out of memory, a graph that fell back) makes it
    lose, with its reason printed and recorded; the run never stops for it."""
    errors = {"fused": kernel_choice.CandidateFailed("eager: the capture failed (operation not permitted)"),
              "aten": torch.cuda.OutOfMemoryError("CUDA out of memory.\nTried ..."),
              "fused-gemm": RuntimeError("out of resources: shared memory")}

    def measure(kernels: str) -> float:
        if kernels in failing:
            raise errors[kernels]
        return {"aten": 0.002, "fused-gemm": 0.003}[kernels]
    choice = kernel_choice.choose_kernels(RunConfig(), Runtime(torch.device("cuda")), print, None, measure)
    assert choice.kernels == "aten"
    problems = {"aten": "CUDA out of memory.", "fused": "eager: the capture failed (operation not permitted)",
                "fused-gemm": "out of resources: shared memory"}
    assert choice.problems == {k: problems[k] for k in failing}
    assert choice.record()["problems"] == choice.problems
    assert "fused failed: eager: the capture failed (operation not permitted)" in capsys.readouterr().out


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
    seconds = kernel_choice.time_steps(build.build_synthetic_run, cfg, Runtime(torch.device("cpu")), "aten")
    assert seconds > 0
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert (np.random.get_state()[1] == state[2]).all()


@pytest.mark.parametrize("capture, failure", [
    ("failing", "eager: the capture failed (no graphs here)"),
    ("stale", "eager: the graph's first replay disagreed with an eager step"),
    ("faithful", None)])
def test_timing_a_candidate_whose_graph_falls_back_fails_it(capture, failure):
    """A candidate is timed as the run would step it: where its graph would not capture or
    replays wrong, the run would not step that way, and its timing says so."""
    def failing(step):
        raise RuntimeError("no graphs here")
    captures = {"failing": failing, "stale": stale_capture, "faithful": faithful_capture}
    runtime = Runtime(torch.device("cpu"), capture=captures[capture])
    cfg = RunConfig(depth=10, growth_rate=4, batch_size=8)
    if failure is None:
        assert kernel_choice.time_steps(build.build_synthetic_run, cfg, runtime, "aten") > 0
    else:
        with pytest.raises(kernel_choice.CandidateFailed, match=failure.replace("(", r"\(").replace(")", r"\)")):
            kernel_choice.time_steps(build.build_synthetic_run, cfg, runtime, "aten")


def test_each_repeat_times_its_steps_and_nothing_else():
    calls = []
    seconds = kernel_choice.seconds_per_step(lambda: calls.append(1), torch.device("cpu"))
    assert len(calls) == kernel_choice.AUTOTUNE_STEPS and seconds >= 0
