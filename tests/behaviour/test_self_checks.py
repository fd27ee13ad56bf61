"""The step checks itself (loop/training.py): the CUDA graph's first replay against an eager step,
each epoch's bookkeeping, the configurations never captured; config.json's record of how the
run ran. On the CPU the graph is a stand-in capture that replays right or wrong."""
from __future__ import annotations

import json
import re

import pytest
import torch

import train
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.loop import training
from densenet_trainer.run.checkpoint import Checkpoint
from densenet_trainer.runtime import Runtime
from helpers import TINY, config_of, faithful_capture, metrics, stale_capture


def two_epochs(tmp_path, cifar_dir, name: str, *more: str) -> RunConfig:
    """Two epochs of the tiny model, batch 16, into ``tmp_path / name``."""
    return config_of("--data-dir", cifar_dir, *TINY, "--batch-size", "16", "--epochs", "2",
                     "--save", tmp_path / name, *more)[0]


# ---------------------------------------------------------------- each epoch


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

    cfg = two_epochs(tmp_path, cifar_dir, "run")
    with pytest.raises(training.StepCheckFailed, match="epoch 1 did not train the steps it ran: "
                                                       "the batch counter is at 5, not 10"):
        train.train(cfg, runtime=Runtime(torch.device("cpu"), capture=later_nothing))
    assert (tmp_path / "run" / "train.csv").read_text().count("\n") == 1  # the header alone
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------- the fused kernels' self-test


@pytest.mark.slow
@pytest.mark.parametrize("fault, reason", [
    ("error", "the kernels in torch.float32: RuntimeError: Triton launcher: Python.h: No such file"),
    ("tail", "the kernels in torch.float32: stats' variance: Tensor-likes are not close!")])
def test_a_kernel_that_fails_its_self_test_is_not_used(broken, fault, reason, tmp_path, cifar_dir, capsys):
    """One warning, ATen's kernels, and config.json says why; the run's numbers are ATen's."""
    broken(fault)
    assert train.train(two_epochs(tmp_path, cifar_dir, "broken")) == 0
    out = capsys.readouterr().out
    assert out.count("warning: the fused kernels failed their self-test on cpu (") == 1
    record = json.loads((tmp_path / "broken" / "config.json").read_text())
    assert record["kernels_used"] == "aten on cpu"
    assert record["kernels_chosen"]["why"].startswith(
        f"--kernels auto on cpu, but the fused kernels failed their self-test ({reason}")
    assert train.train(two_epochs(tmp_path, cifar_dir, "aten", "--kernels", "aten")) == 0
    assert metrics(tmp_path / "broken") == metrics(tmp_path / "aten")


# ---------------------------------------------------------------- --kernels auto on a GPU


def test_a_checkpoint_keeps_the_kernels_it_trained_with(tmp_path, cifar_dir):
    assert train.train(two_epochs(tmp_path, cifar_dir, "run")) == 0
    state = Checkpoint.load(tmp_path / "run").state
    assert state["kernels"] == {"device_type": "cpu", "kernels": "fused"}


# ---------------------------------------------------------------- what config.json says

@pytest.mark.slow
def test_config_json_tells_how_the_steps_ran(tmp_path, cifar_dir, capsys):
    cpu = Runtime(torch.device("cpu"))
    for name, runtime, status in [
            ("eager", cpu, "eager (CUDA graphs are for GPUs; this runs on cpu)"),
            ("graphed", Runtime(torch.device("cpu"), capture=faithful_capture), "graphed (captured in "),
            ("dropped", Runtime(torch.device("cpu"), capture=stale_capture),
             "eager: the graph's first replay disagreed with an eager step (the counters differ)")]:
        assert train.train(two_epochs(tmp_path, cifar_dir, name), runtime=runtime) == 0
        record = json.loads((tmp_path / name / "config.json").read_text())
        assert record["step"].startswith(status)
        assert name != "graphed" or record["step"].endswith(" s; its first replay matched an eager step)")
        evaluation = {"eager": "eager (CUDA graphs are for GPUs; this runs on cpu)",
                      "graphed": "graphed (captured in ", "dropped": "eager: the capture failed ("}[name]
        assert record["evaluation"]["test"].startswith(evaluation), record["evaluation"]
        assert record["kernels_used"] == "fused on cpu"
        assert set(record["startup_seconds"]) == {"data", "kernels", "model", "self-test"}
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
    assert re.fullmatch(r"graphed \(captured in [0-9.]+ s; its first replay matched an eager step\)", record["step"])
    assert re.fullmatch(r"graphed \(captured in [0-9.]+ s; its first replay matched an eager batch\)",
                        record["evaluation"]["test"])
    assert set(record["kernels_chosen"]["ms_per_step"]) == {"aten", "fused"}
    assert "problems" not in record["kernels_chosen"] and record["kernels_chosen"]["seconds"] > 0
    assert {"gpu", "gpu_memory_gib", "cuda", "cudnn", "triton"} <= set(record["environment"])
