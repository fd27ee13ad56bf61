"""train.py --seeds: a run per seed in one process, each the run --seed alone makes (its
folder, its files, its numbers), each ending alone, all saved by a signal, all refused at once."""
from __future__ import annotations

import json
import signal
import sys
from types import SimpleNamespace

import pytest
import torch

import train
from densenet_trainer.config.cli import UserError
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.run import seeds
from densenet_trainer.run.files import WorkDirLock
from densenet_trainer.runtime import Runtime
from helpers import (
    ROOT,
    TINY,
    TINY_MODEL,
    check_refused,
    config_of,
    interrupt,
    metrics,
    read_csv,
    run_main,
    static_grads_capture,
)

# dropout draws from the process's generators at every step: the runs' turns must keep them apart
FLAGS = [*TINY, "--epochs", "2", "--val-size", "32", "--precision", "bf16", "--dropout", "0.2"]


def folders(tmp_path, seeds) -> list:
    return [tmp_path / f"seed{seed}" for seed in seeds]


def same_files(group, alone) -> None:
    """Two runs' rows (but timings) and checkpoints are equal."""
    assert metrics(group) == metrics(alone)
    assert [(r["loss"], r["error"]) for r in read_csv(group / "val.csv")] == \
        [(r["loss"], r["error"]) for r in read_csv(alone / "val.csv")]
    for name in ("checkpoint.pt", "best.pt"):
        ours, theirs = (torch.load(w / name, weights_only=False) for w in (group, alone))
        assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
        assert torch.equal(ours["rng"]["torch"], theirs["rng"]["torch"])
        assert ours["config"]["seed"] == theirs["config"]["seed"]


@pytest.mark.slow
def test_three_seeds_at_once_equal_three_runs_alone(tmp_path, cifar_dir, capsys):
    common = ["--data-dir", cifar_dir, *FLAGS]
    status, out, err = run_main(capsys, train.main, *common, "--seeds", "0", "1", "2",
                                "--save", tmp_path / "group" / "seed{seed}")
    assert status == 0, err
    assert [line.split(":")[0] for line in out.splitlines() if " done: " in line] == \
        ["[seed 0] done", "[seed 1] done", "[seed 2] done"]
    for seed in (0, 1, 2):
        alone = tmp_path / "alone" / f"seed{seed}"
        status, _, err = run_main(capsys, train.main, *common, "--seed", seed, "--save", alone)
        assert status == 0, err
        same_files(tmp_path / "group" / f"seed{seed}", alone)


def test_default_folders_are_those_of_each_seed_alone(cifar_dir):
    cfg, given = config_of("--data-dir", cifar_dir, *TINY, "--epochs", "1")
    configs = seeds.seed_configs(cfg, given, [0, 7], Runtime(torch.device("cpu")))
    assert [c.save for c in configs] == [config_of("--data-dir", cifar_dir, *TINY, "--epochs", "1",
                                                   "--seed", s)[0].save for s in ("0", "7")]
    assert configs[1].save.endswith("-seed7")


class DivergesForSeed1(RunConfig):
    """Seed 1's schedule explodes in its second epoch; the other seeds' is the paper's."""

    def learning_rate(self, epoch: int) -> float:
        return 1e6 if epoch == 1 and self.seed == 1 else super().learning_rate(epoch)


def test_a_diverging_seed_stops_alone(tmp_path, cifar_dir, capsys):
    cfg, given = config_of("--data-dir", cifar_dir, *TINY, "--epochs", "2",
                           "--save", tmp_path / "seed{seed}")
    status = train.train(DivergesForSeed1(**cfg.to_dict()), given, seeds=[0, 1, 2])
    _, err = capsys.readouterr()
    assert status == 1
    assert err.startswith("[seed 1] error: the training loss is not finite at epoch 2"), err
    assert len(err.strip().splitlines()) == 1, err
    rows = {seed: [r["epoch"] for r in read_csv(work / "test.csv")]
            for seed, work in zip((0, 1, 2), folders(tmp_path, (0, 1, 2)))}
    assert rows == {0: ["1", "2"], 1: ["1"], 2: ["1", "2"]}


@pytest.mark.slow
def test_sigusr1_saves_every_seed_and_the_resume_ends_where_uninterrupted_runs_end(tmp_path, cifar_dir, capsys):
    flags = ["--data-dir", str(cifar_dir), *TINY, "--epochs", "3", "--dropout", "0.2", "--seeds", "0", "1", "2"]
    stopped = interrupt([sys.executable, str(ROOT / "train.py"), *flags, "--save", str(tmp_path / "s{seed}")],
                        "[seed 1] epoch 1/3", signal.SIGUSR1)
    assert stopped.count("stopped by SIGUSR1 in epoch") == 3, stopped
    assert "every run was saved: continue them all with the same command and --resume" in stopped
    status, _, err = run_main(capsys, train.main, *flags, "--save", tmp_path / "s{seed}", "--resume")
    assert status == 0, err
    status, _, err = run_main(capsys, train.main, *flags, "--save", tmp_path / "whole{seed}")
    assert status == 0, err
    for seed in (0, 1, 2):
        assert metrics(tmp_path / f"s{seed}") == metrics(tmp_path / f"whole{seed}")


def test_a_busy_folder_of_one_seed_refuses_all_before_any_write(tmp_path, cifar_dir, capsys):
    busy = tmp_path / "seed1"
    busy.mkdir()
    with WorkDirLock(busy, "") as lock:
        lock.acquire()
        status, _, err = run_main(capsys, train.main, "--data-dir", cifar_dir, *TINY, "--epochs", "1",
                                  "--seeds", "0", "1", "2", "--save", tmp_path / "seed{seed}")
    check_refused(status, err, f"{busy} is in use by")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed1"]
    assert list(busy.iterdir()) == []


def test_resume_continues_each_seed_and_starts_a_missing_one(tmp_path, cifar_dir, capsys):
    flags = ["--data-dir", cifar_dir, *TINY, "--epochs", "1", "--save", tmp_path / "seed{seed}"]
    status, _, err = run_main(capsys, train.main, *flags, "--seeds", "0")
    assert status == 0, err
    status, out, err = run_main(capsys, train.main, *flags, "--seeds", "0", "1", "--resume")
    assert status == 0, err
    assert f"[seed 0] {tmp_path / 'seed0'} has finished its 1 epochs" in out
    assert [r["epoch"] for r in read_csv(tmp_path / "seed1" / "test.csv")] == ["1"]
    status, out, err = run_main(capsys, train.main, *flags, "--seeds", "0", "1", "--resume")
    assert status == 0 and out.count("has finished its 1 epochs") == 2, (out, err)


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "1", "--seed", "2"], "--seeds trains a run per seed: drop --seed"),
    (["--seeds", "1", "1"], "--seeds 1 1 names a seed twice"),
    (["--seeds", "1", "2", "--save", "runs/one"], "put {seed} in it"),
    (["--seeds", "1", "--evaluate", "x.pt"], "drop --evaluate"),
])
def test_seeds_refusals(tmp_path, cifar_dir, capsys, flags, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(capsys, train.main, "--data-dir", cifar_dir, *TINY, *flags)
    check_refused(status, err, message)
    assert list(tmp_path.iterdir()) == []


def test_seeds_under_torchrun_are_refused(cifar_dir):
    cfg, given = config_of("--data-dir", cifar_dir, *TINY)
    with pytest.raises(UserError, match="under torchrun give each seed its own job"):
        seeds.seed_configs(cfg, given, [0, 1], Runtime(torch.device("cpu"), rank=0, world_size=2))


def test_graphed_steps_taking_turns_equal_eager_ones(tmp_path, cifar_dir):
    """A stand-in capture as a CUDA graph's (its gradients allocated inside it, per run): each
    run's graph is its own, and the runs' numbers are those of eager steps."""
    for name, runtime in [("eager", Runtime(torch.device("cpu"))),
                          ("graphed", Runtime(torch.device("cpu"), capture=static_grads_capture))]:
        cfg, given = config_of("--data-dir", cifar_dir, *TINY, "--epochs", "1",
                               "--save", tmp_path / name / "seed{seed}")
        assert train.train(cfg, given, runtime=runtime, seeds=[0, 1]) == 0
    for seed in (0, 1):
        record = json.loads((tmp_path / "graphed" / f"seed{seed}" / "config.json").read_text())
        assert record["step"].startswith("graphed (captured in "), record["step"]
        assert metrics(tmp_path / "graphed" / f"seed{seed}") == metrics(tmp_path / "eager" / f"seed{seed}")


def test_runs_that_do_not_fit_the_gpu_are_refused_in_one_line(monkeypatch, cifar_dir):
    monkeypatch.setattr(seeds, "peak_memory", lambda run: 3 * 2**30)
    monkeypatch.setattr(seeds, "runs_that_fit", lambda device, need: 2)
    run = SimpleNamespace(config=None, runtime=SimpleNamespace(device=None), kernel_choice=None)
    with pytest.raises(UserError, match=r"--seeds: 3 runs need about 9.0 GiB of GPU memory together "
                                        r"\(3.00 GiB each\) and 2 fit: give at most 2 seeds at once"):
        seeds.refuse_unless_fit(run, 3)
    seeds.refuse_unless_fit(run, 2)


@pytest.mark.cuda
def test_two_seeds_on_a_gpu_each_train_on_their_own_stream(tmp_path, cifar_dir, capsys):
    flags = ["--data-dir", cifar_dir, *TINY_MODEL[:-2], "--device", "cuda", "--epochs", "2"]
    status, out, err = run_main(capsys, train.main, *flags, "--seeds", "0", "1",
                                "--save", tmp_path / "seed{seed}")
    assert status == 0, err
    for seed in (0, 1):
        assert [r["epoch"] for r in read_csv(tmp_path / f"seed{seed}" / "test.csv")] == ["1", "2"]
        record = json.loads((tmp_path / f"seed{seed}" / "config.json").read_text())
        assert record["step"].startswith("graphed"), record["step"]


def test_a_refusal_of_one_seed_at_its_claim_writes_no_other_seed(tmp_path, cifar_dir, capsys):
    """Seed 1's folder is a file: found only when the folders are made, before any is written."""
    (tmp_path / "file1").write_text("mine\n")
    status, _, err = run_main(capsys, train.main, "--data-dir", cifar_dir, *TINY, "--epochs", "1",
                              "--seeds", "0", "1", "--save", tmp_path / "file{seed}")
    check_refused(status, err, f"cannot write to {tmp_path / 'file1'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file1"]
    assert (tmp_path / "file1").read_text() == "mine\n"


def test_two_seeds_in_one_folder_are_refused(tmp_path, cifar_dir, capsys):
    (tmp_path / "x0").mkdir()
    (tmp_path / "x1").mkdir()
    status, _, err = run_main(capsys, train.main, "--data-dir", cifar_dir, *TINY, "--seeds", "0", "1",
                              "--save", tmp_path / "x{seed}" / ".." / "same")
    check_refused(status, err, f"gives two seeds one folder ({tmp_path / 'same'})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x0", "x1"]


def test_seed_in_save_without_seeds_is_the_runs_own(tmp_path, cifar_dir, capsys):
    status, _, err = run_main(capsys, train.main, "--data-dir", cifar_dir, *TINY, "--epochs", "1",
                              "--seed", "3", "--save", tmp_path / "s{seed}")
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s3"]
