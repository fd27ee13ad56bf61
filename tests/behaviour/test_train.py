"""train.py as a user runs it: CSVs, schedules, resume, one process per work directory, evaluation.

Most runs call ``train.main`` in this process (the command's own code, one torch start-up
for all); the first test and the lock test use real processes.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import densenet_trainer
import plot
import train
from densenet_trainer import runtime
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.loop import progress
from densenet_trainer.run.checkpoint import Checkpoint
from densenet_trainer.run.files import save_checkpoint
from helpers import (
    FIXTURES,
    ROOT,
    TINY,
    check_refused,
    config_of,
    metrics,
    read_csv,
    run_cli,
    run_main,
    snapshot,
    start_run,
    write_cifar10,
    write_cifar100,
)


def run(capsys, *argv) -> tuple[int, str, str]:
    """train.py's main in this process: (exit status, stdout, stderr)."""
    return run_main(capsys, train.main, *argv)


@pytest.mark.slow
def test_two_epochs_on_shared_subset(tmp_path, shared_data):
    work = tmp_path / "run"
    result = run_cli("train.py", "--data-dir", shared_data, "--save", work, *TINY, "--epochs", "2",
                     "--train-subset", "256", "--test-subset", "128")
    assert result.returncode == 0, result.stderr
    assert "found 4660 training and 846 test images" in result.stdout
    assert "2,666 parameters" in result.stdout
    assert re.search(r"start-up data [0-9.]+ s, kernels [0-9.]+ s, model [0-9.]+ s, self-test [0-9.]+ s\n", result.stdout)
    assert "final test error" in result.stdout
    train_rows, test_rows = read_csv(work / "train.csv"), read_csv(work / "test.csv")
    assert list(train_rows[0]) == ["epoch", "lr", "loss", "error", "seconds", "images_per_s"]
    assert list(test_rows[0]) == ["epoch", "loss", "error", "seconds"]
    assert [r["epoch"] for r in train_rows] == ["1", "2"] == [r["epoch"] for r in test_rows]
    for row in train_rows + test_rows:
        assert 0 <= float(row["error"]) <= 100 and float(row["loss"]) > 0
    config = json.loads((work / "config.json").read_text())
    assert config["parameters"] == 2666 and config["config"]["depth"] == 10
    assert config["train_images"] == 256 and config["environment"]["torch"]
    code = config["code"]  # the code that trained it: this checkout's commit
    assert code["version"] == densenet_trainer.__version__
    if (ROOT / ".git").exists():
        assert len(code["commit"]) == 40 and isinstance(code["modified"], bool)
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint.pt", "config.json", "test.csv",
                                                      "train.csv"]  # the lock file is gone


# ---------------------------------------------------------------- runs

def test_schedule_validation_and_refusal_to_overwrite(tmp_path, cifar_dir, capsys):
    work = tmp_path / "run"
    out = start_run(capsys, work, cifar_dir, "--epochs", "4", "--val-size", "32")
    assert "using 128 training, 32 validation and 48 test images" in out
    lrs = [float(r["lr"]) for r in read_csv(work / "train.csv")]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])  # divided by 10 at 50% and 75%
    assert [r["epoch"] for r in read_csv(work / "val.csv")] == ["1", "2", "3", "4"]
    before = snapshot(work)
    status, _, err = run(capsys, "--data-dir", cifar_dir, "--save", work, *TINY, "--epochs", "4")
    assert status == 2
    assert err.strip().splitlines() == [
        f"error: {work} already holds a run; continue it with --resume --save {work} "
        f"or start a new one with another --save DIR"]
    assert snapshot(work) == before


def test_seeds_get_folders_of_their_own_and_a_resume_finds_its_run(tmp_path, cifar_dir, capsys,
                                                                    monkeypatch):
    """Without --save, runs that differ in a setting that changes the numbers never meet in
    one folder; a --resume whose --epochs renames the default folder is told where its run is."""
    monkeypatch.chdir(tmp_path)
    for seed in ("0", "1"):
        status, out, err = run(capsys, "--data-dir", cifar_dir, *TINY, "--epochs", "1", "--seed", seed)
        assert status == 0, err
    first = Path("work/cifar10-densenet-bc-10-4-epochs1-batch32")
    assert sorted(Path("work").iterdir()) == [first, Path(f"{first}-seed1")]
    status, _, err = run(capsys, "--data-dir", cifar_dir, *TINY, "--epochs", "2", "--resume")
    check_refused(status, err, f"work/cifar10-densenet-bc-10-4-epochs2-batch32 holds no run to resume "
                               f"(no checkpoint.pt or config.json); a run of these settings is "
                               f"elsewhere: --resume --save {first}")
    status, _, err = run(capsys, "--data-dir", cifar_dir, *TINY, "--epochs", "2", "--resume", "--lr", "0.2")
    check_refused(status, err, "start a new run without --resume")  # another lr: none is


def test_a_restart_of_the_same_job_continues_its_run(tmp_path, cifar_dir, capsys, monkeypatch):
    """A launcher's rerun of the job that worked on a run (torchrun's restart count above zero
    under the same rendezvous id; SLURM's requeue) continues it with no flag; any other job
    finding the run is refused as before; --auto-resume says so for other launchers."""
    work = tmp_path / "run"
    flags = ["--data-dir", cifar_dir, "--save", work, *TINY, "--epochs", "3"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert run(capsys, *flags, "--stop-after", "1")[0] == 0
    before = snapshot(work)
    for job, restart in (("job-a", "0"), ("job-b", "1")):  # not a restart; another job's restart
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        status, _, err = run(capsys, *flags, "--stop-after", "2")
        check_refused(status, err, f"{work} already holds a run; continue it with --resume")
    assert snapshot(work) == before
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the job that goes on is recorded too
    status, out, err = run(capsys, *flags, "--stop-after", "2")
    assert status == 0, err
    assert f"resuming {work} after epoch 1 (restart 1 of torchrun job job-a, which worked on this run)" in out
    resumes = json.loads((work / "config.json").read_text())["resumes"]
    assert resumes[-1]["continued_by"] == "restart 1 of torchrun job job-a, which worked on this run"
    assert resumes[-1]["jobs"] == {"torchrun": {"id": "job-a", "restart": 1, "agents": [runtime.agent_identity()]},
                                   "slurm": {"id": "4242", "restart": 0}}
    # a later launch that reuses the rendezvous id is another job: its restart is refused
    agent = runtime.agent_identity
    monkeypatch.setattr(runtime, "agent_identity", lambda: "elsewhere:1:1")
    status, _, err = run(capsys, *flags, "--stop-after", "2")
    check_refused(status, err, f"{work} already holds a run; continue it with --resume")
    monkeypatch.setattr(runtime, "agent_identity", agent)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # SLURM requeued the job that resumed it
    status, out, err = run(capsys, *flags)
    assert status == 0 and "(restart 2 of slurm job 4242, which worked on this run)" in out, err
    assert [r["epoch"] for r in read_csv(work / "train.csv")] == ["1", "2", "3"]


def test_auto_resume_starts_or_continues_but_never_changes_a_run(tmp_path, cifar_dir, capsys):
    work = tmp_path / "run"
    flags = ["--data-dir", cifar_dir, "--save", work, *TINY, "--epochs", "2", "--auto-resume"]
    whole = tmp_path / "whole"
    start_run(capsys, whole, cifar_dir, "--epochs", "2")
    out = start_run(capsys, work, cifar_dir, "--epochs", "2", "--auto-resume", "--stop-after", "1")
    assert "resuming" not in out  # nothing there: it starts
    status, _, err = run(capsys, *flags, "--lr", "0.05")
    check_refused(status, err, "--lr 0.05 (the run has 0.1) would change the run")
    status, out, err = run(capsys, *flags)
    assert status == 0 and f"resuming {work} after epoch 1 (--auto-resume)" in out, err
    assert metrics(work) == metrics(whole)
    status, out, _ = run(capsys, *flags)  # finished: nothing to do, said so
    assert status == 0 and "has finished its 2 epochs" in out


def test_resume_equals_uninterrupted_run(tmp_path, cifar_dir, capsys):
    flags = ["--epochs", "2", "--dropout", "0.1"]  # dropout: the torch RNG must be restored too
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    start_run(capsys, whole, cifar_dir, *flags)
    out = start_run(capsys, parts, cifar_dir, *flags, "--stop-after", "1")
    assert "continue with --resume" in out and len(read_csv(parts / "train.csv")) == 1
    stale = parts / ".checkpoint.pt.x1y2_3z4.tmp"  # what a save killed halfway leaves
    stale.write_bytes(b"\0" * 1000)
    notes = parts / ".notes.tmp"  # a user's own: not the trainer's to remove
    notes.write_text("mine")
    status, out, err = run(capsys, "--resume", "--save", parts, "--data-dir", cifar_dir)
    assert status == 0, err
    assert "resuming" in out and not stale.exists() and notes.read_text() == "mine"
    assert metrics(parts) == metrics(whole)
    config = json.loads((parts / "config.json").read_text())
    assert config["resumes"][0]["from_epoch"] == 1


def test_resume_refusals_and_extensions(tmp_path, cifar_dir, capsys):
    work = tmp_path / "run"
    start_run(capsys, work, cifar_dir, "--epochs", "2")
    before = snapshot(work)
    status, _, err = run(capsys, "--resume", "--save", work, "--depth", "16")
    assert status == 2 and "--depth 16 (the run has 10)" in err
    status, _, err = run(capsys, "--resume", "--save", work, "--epochs", "4")
    assert status == 2 and "would raise the learning rate" in err and "epoch 3 trains at lr 0.01" in err
    assert snapshot(work) == before
    status, out, _ = run(capsys, "--resume", "--save", work)
    assert status == 0 and "has finished its 2 epochs; pass --epochs N to train longer" in out
    status, out, err = run(capsys, "--resume", "--save", work, "--epochs", "3", "--data-dir", cifar_dir)
    assert status == 0, err  # one more epoch at the last rate, said so
    assert "--epochs 3: the 2 epoch(s) trained followed the schedule of --epochs 2, the last at lr 0.001; " \
           "under --epochs 3, epoch 3 trains at lr 0.001" in out
    status, out, err = run(capsys, "--resume", "--save", work, "--epochs", "6", "--reschedule",
                           "--data-dir", cifar_dir)
    assert status == 0, err
    rows = read_csv(work / "train.csv")
    assert [(r["epoch"], float(r["lr"])) for r in rows] == [
        ("1", 0.1), ("2", 0.001), ("3", 0.001), ("4", 0.01), ("5", 0.001), ("6", 0.001)]
    resumes = json.loads((work / "config.json").read_text())["resumes"]
    assert [r["changes"]["epochs"] for r in resumes] == [3, 6]
    assert "epoch 4 trains at lr 0.01" in resumes[1]["changes"]["schedule"]


def test_a_moved_run_is_named_where_it_is(tmp_path, cifar_dir, capsys):
    first = tmp_path / "first"
    start_run(capsys, first, cifar_dir, "--epochs", "2", "--stop-after", "1")
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    status, _, err = run(capsys, "--resume", "--save", moved, "--seed", "5")
    assert status == 2 and f"would change the run in {moved};" in err
    status, _, err = run(capsys, "--resume", "--save", moved, "--data-dir", cifar_dir)
    assert status == 0, err
    assert json.loads((moved / "config.json").read_text())["config"]["save"] == str(moved)


def test_resume_before_the_first_checkpoint_starts_over_but_never_drops_rows(tmp_path, cifar_dir,
                                                                             capsys):
    work = tmp_path / "run"
    start_run(capsys, work, cifar_dir, "--epochs", "2")
    whole = metrics(work)
    (work / "checkpoint.pt").unlink()
    before = snapshot(work)
    status, _, err = run(capsys, "--resume", "--save", work, "--data-dir", cifar_dir)
    assert status == 2 and "has epochs logged in train.csv but no checkpoint.pt" in err
    assert snapshot(work) == before
    for name in ("train.csv", "test.csv"):  # killed between the rows of epoch 1 and its checkpoint
        (work / name).write_text("\n".join((work / name).read_text().splitlines()[:2]) + "\n")
    status, out, err = run(capsys, "--resume", "--save", work, "--data-dir", cifar_dir)
    assert status == 0, err
    assert metrics(work) == whole  # epoch 1 again, to the same numbers


def test_evaluate_writes_per_class_errors(tmp_path, cifar_dir, capsys):
    work = tmp_path / "run"
    start_run(capsys, work, cifar_dir, "--epochs", "1")
    last_error = float(read_csv(work / "test.csv")[-1]["error"])
    status, out, err = run(capsys, "--evaluate", work / "checkpoint.pt", "--data-dir", cifar_dir,
                           "--device", "cpu")
    assert status == 0, err
    assert f"test error {last_error:.2f}%" in out
    rows = read_csv(work / "checkpoint-classes.csv")
    assert [r["name"] for r in rows][:2] == ["airplane", "automobile"]
    assert sum(int(r["images"]) for r in rows) == 48
    assert sum(int(r["errors"]) for r in rows) == round(last_error * 48 / 100)
    confusion = list(csv.reader(open(work / "checkpoint-confusion.csv")))
    assert len(confusion) == 11 and sum(int(v) for row in confusion[1:] for v in row[1:]) == 48
    # the run's directory, and the data from where the run was trained (no --data-dir)
    status, out, _ = run(capsys, "--evaluate", work, "--tta")
    assert status == 0 and "flip test-time augmentation" in out, out
    assert (work / "checkpoint-classes-tta.csv").is_file() and not (work / ".lock").exists()
    status, _, err = run(capsys, "--evaluate", work, "--data-dir", tmp_path / "elsewhere", "--no-download")
    assert status == 2 and f"cifar10 is not in {tmp_path / 'elsewhere'}" in err


def test_evaluate_tests_the_images_the_run_was_tested_on(tmp_path, cifar_dir, capsys):
    """A run tested on a subset is evaluated on that subset, and says so; another selection is
    a flag, and its files never replace those of the run's own."""
    work = tmp_path / "run"
    start_run(capsys, work, cifar_dir, "--epochs", "1", "--test-subset", "20")
    logged = float(read_csv(work / "test.csv")[-1]["error"])
    status, out, err = run(capsys, "--evaluate", work)
    assert status == 0, err
    assert f"test error {logged:.2f}%" in out
    assert "on 20 images (the test set's first 20: --test-subset 20, as the run was tested)" in out
    own = (work / "checkpoint-classes.csv").read_text()
    assert sum(int(r["images"]) for r in read_csv(work / "checkpoint-classes.csv")) == 20
    status, out, err = run(capsys, "--evaluate", work, "--test-subset", "0")
    assert status == 0 and "on 48 images" in out and "--test-subset" not in out, err
    assert sum(int(r["images"]) for r in read_csv(work / "checkpoint-classes-testall.csv")) == 48
    assert (work / "checkpoint-classes.csv").read_text() == own


def test_every_file_of_a_run_carries_its_identity(tmp_path, cifar_dir, capsys):
    """config.json and each checkpoint name the same run; a resume keeps it."""
    work = tmp_path / "run"
    start_run(capsys, work, cifar_dir, "--epochs", "2", "--val-size", "32", "--stop-after", "1")
    run_id = json.loads((work / "config.json").read_text())["run_id"]
    assert len(run_id) == 32
    for name in ("checkpoint.pt", "best.pt"):
        assert Checkpoint.load(work / name).state["run_id"] == run_id
    status, _, err = run(capsys, "--resume", "--save", work)
    assert status == 0, err
    assert json.loads((work / "config.json").read_text())["run_id"] == run_id
    assert Checkpoint.load(work).state["run_id"] == run_id


def test_files_follow_the_umask(tmp_path, cifar_dir, capsys):
    """CSVs, config.json and the checkpoint readable by the group and others where the umask
    says so, as the figures are; a stricter umask is followed too."""
    old = os.umask(0o022)
    try:
        start_run(capsys, tmp_path / "open", cifar_dir, "--epochs", "1")
        os.umask(0o077)
        start_run(capsys, tmp_path / "private", cifar_dir, "--epochs", "1")
    finally:
        os.umask(old)
    for run_name, mode in (("open", 0o644), ("private", 0o600)):
        for name in ("train.csv", "test.csv", "config.json", "checkpoint.pt"):
            assert (tmp_path / run_name / name).stat().st_mode & 0o777 == mode, (run_name, name)


def test_the_lines_say_when_the_run_will_end(tmp_path, cifar_dir, capsys):
    """The progress lines and each epoch's line give the whole run's remaining time too."""
    out = start_run(capsys, tmp_path / "eta", cifar_dir, "--epochs", "2")
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert "  run ends in about " in epoch_lines[0] and "run ends" not in epoch_lines[1]
    lines = [line for line in out.splitlines() if line.startswith("  epoch ")]
    assert all(", the run in about " in line for line in lines if line.startswith("  epoch 1:"))
    assert not any("the run in" in line for line in lines if line.startswith("  epoch 2:"))


def test_progress_lines_without_a_terminal(tmp_path, cifar_dir, capsys):
    """Output to a file gets a line at each quarter of the epoch, and every ``every`` seconds."""
    out = start_run(capsys, tmp_path / "quarters", cifar_dir, "--epochs", "1")  # 5 steps
    lines = [line for line in out.splitlines() if line.startswith("  epoch 1: step")]
    assert [line.split("(")[0] for line in lines] == [f"  epoch 1: step {s}/5 " for s in (2, 3, 4)]
    assert all("img/s" in line and "epoch ends in" in line and "loss" in line for line in lines)
    for every, shown in ((0, [1, 2, 3, 4]), (progress.ProgressLines.EVERY, [2, 3, 4])):
        display = progress.ProgressLines(1, 3, 5, 0, every=every)
        due = [done for done in range(1, 6) if display.due(done)
               and display.show(done, 2.3, 90.0, 100.0, 1.0) is None]
        assert due == shown  # never at the last step: the epoch's own line follows
    assert capsys.readouterr().out.count("  epoch 1: step 4/5 (80%)") == 2


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--precision", "fp16"],
                                   ["--memory-efficient", "--no-channels-last"],
                                   ["--memory-efficient"], ["--kernels", "aten"]])
def test_speed_flags_train_on_cpu(tmp_path, cifar_dir, capsys, finished, flags):
    """Each precision and path trains to the losses of the default path (fused, channels-last,
    fp32), within its precision."""
    start_run(capsys, tmp_path / "run", cifar_dir, "--epochs", "1", *flags)
    (_, reference), (_, ours) = metrics(finished("--epochs", "1")), metrics(tmp_path / "run")
    tolerance = 0.05 if "--precision" in flags else 1e-4
    assert float(ours[0][1]) == pytest.approx(float(reference[0][1]), rel=tolerance)
    used = json.loads((tmp_path / "run" / "config.json").read_text())["kernels_used"]
    fused_path = "--kernels" not in flags and "--precision" not in flags
    assert used == ("fused on cpu" if fused_path else "aten on cpu")


@pytest.mark.slow
def test_compile_trains_to_the_eager_losses(tmp_path, cifar_dir, capsys):
    """--compile (minutes of compiling on a CPU) gives the eager run's numbers."""
    start_run(capsys, tmp_path / "eager", cifar_dir, "--epochs", "1", "--memory-efficient")
    start_run(capsys, tmp_path / "compiled", cifar_dir, "--epochs", "1", "--memory-efficient", "--compile")
    (eager_train, eager_test), (train_rows, test_rows) = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert float(train_rows[0][2]) == pytest.approx(float(eager_train[0][2]), rel=1e-4)
    assert float(test_rows[0][1]) == pytest.approx(float(eager_test[0][1]), rel=1e-4)


# ---------------------------------------------------------------- one process per directory

@pytest.mark.slow
def test_a_second_process_is_refused_while_a_run_trains(tmp_path, cifar_dir, capsys):
    """A real training process holds the directory; a fresh start, a resume and an evaluation
    from this process are refused in one line naming it, and its rows stay whole."""
    work = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--data-dir", str(cifar_dir), "--save", str(work),
         *TINY, "--epochs", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in first.stdout:  # the first epoch is logged: the directory is busy from here on
            if line.startswith("epoch 1/200"):
                break
        named = f"{work} is in use by pid {first.pid} on "
        for argv in (["--data-dir", cifar_dir, "--save", work, *TINY],
                     ["--resume", "--save", work, "--data-dir", cifar_dir],
                     ["--evaluate", work / "checkpoint.pt", "--data-dir", cifar_dir]):
            status, _, err = run(capsys, *argv)
            lines = err.strip().splitlines()
            assert status == 2 and len(lines) == 1 and named in lines[0], err
            assert "train.py --data-dir" in lines[0]  # with the other process's command
        assert first.poll() is None  # it was still training throughout
    finally:
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGINT, stderr
    epochs = [int(r["epoch"]) for r in read_csv(work / "train.csv")]
    assert epochs == list(range(1, len(epochs) + 1)) and not (work / ".lock").exists()
    status, _, err = run(capsys, "--resume", "--save", work, "--data-dir", cifar_dir, "--stop-after",
                         str(epochs[-1] + 1))
    assert status == 0, err  # the kernel dropped the lock with the process


def test_run_config_is_what_config_json_records(tmp_path, cifar_dir, capsys):
    work = tmp_path / "run"
    start_run(capsys, work, cifar_dir, "--epochs", "1")
    recorded = json.loads((work / "config.json").read_text())["config"]
    cfg, _ = config_of("--data-dir", str(cifar_dir), "--save", str(work), *TINY, "--epochs", "1")
    assert recorded == cfg.to_dict() and "reschedule" not in recorded
    assert RunConfig.from_dict(recorded, "config.json") == cfg


def test_best_checkpoint_by_validation_error(tmp_path, cifar_dir, capsys):
    """With --val-size, best.pt holds the epoch of lowest validation error, config.json names it,
    and --evaluate takes it."""
    work = tmp_path / "run"
    out = start_run(capsys, work, cifar_dir, "--epochs", "3", "--val-size", "32")
    errors = [float(r["error"]) for r in read_csv(work / "val.csv")]
    chosen = errors.index(min(errors)) + 1
    assert f"lowest validation error {min(errors):.2f}% at epoch {chosen}, saved as {work / 'best.pt'}" in out
    assert Checkpoint.load(work / "best.pt").epoch == chosen
    config = json.loads((work / "config.json").read_text())
    assert config["best_checkpoint"] == {"file": "best.pt", "chosen_by": "lowest validation error"}
    eager = "eager (CUDA graphs are for GPUs; this runs on cpu)"  # how each split was evaluated
    assert config["evaluation"] == {"test": eager, "val": eager}
    status, out, _ = run(capsys, "--evaluate", work / "best.pt")
    assert status == 0 and f"after epoch {chosen}: test error" in out


@pytest.mark.slow
def test_top5_error_for_a_hundred_classes(tmp_path, capsys):
    """CIFAR-100 logs top5_error in every CSV, no higher than the error; plot.py draws it."""
    import plot
    data_dir = write_cifar100(tmp_path / "data", train=96, test=40)
    work = tmp_path / "run"
    start_run(capsys, work, data_dir, "--dataset", "cifar100", "--epochs", "2", "--val-size", "32")
    for name in ("train.csv", "test.csv", "val.csv"):
        rows = read_csv(work / name)
        assert "top5_error" in rows[0], name
        assert all(0 <= float(r["top5_error"]) <= float(r["error"]) for r in rows)
    assert plot.main([str(work)]) == 0
    assert (work / "top5-error.png").is_file()
    status, out, _ = run(capsys, "--evaluate", work)
    assert status == 0 and "(top-5 " in out


# ---------------------------------------------------------------- runs of an earlier version

# Runs written by earlier versions (train.py of commits e92bffc, and 9a4f3b8 before the modules
# moved into densenet_trainer/), each stopped after epoch 1 of 2, beside the CSVs of its
# uninterrupted twin ("-uninterrupted").
OLD_RUNS = ["run-e92bffc", "run-9a4f3b8"]
OLD_RUN_FINISHED = FIXTURES / "run-e92bffc-uninterrupted"
OLD_FLAGS = ["--epochs", "2", "--dropout", "0.1", "--val-size", "32"]  # with TINY's model


def assert_same_numbers(work: Path, reference: Path) -> None:
    """The same losses and errors per epoch and split. The fixture was written on another
    machine, whose float rounding may differ in the last printed digit (a loss to 1e-4, an
    error by one of the 48 test images); a wrong state (weights, optimiser, any RNG, the data
    order) moves the losses by 1e-2 and more."""
    for name in ("train.csv", "test.csv", "val.csv"):
        rows, expected = read_csv(work / name), read_csv(reference / name)
        assert [r["epoch"] for r in rows] == [r["epoch"] for r in expected], name
        for row, want in zip(rows, expected):
            assert float(row["loss"]) == pytest.approx(float(want["loss"]), rel=1e-4), name
            assert float(row["error"]) == pytest.approx(float(want["error"]), abs=100 / 48 + 1e-6)
            assert row.get("lr") == want.get("lr"), name


@pytest.mark.parametrize("fixture", OLD_RUNS)
def test_a_run_written_by_an_earlier_version_evaluates_and_resumes(tmp_path, cifar_dir, capsys, fixture):
    """The fixture ran on conftest's generated CIFAR-10 (the same images as ``cifar_dir``), with
    dropout (every RNG matters) and a validation split (best.pt). Evaluated now, its
    checkpoints give the test error it logged; resumed now, it ends as that version's
    uninterrupted run did."""
    work = tmp_path / "old"
    shutil.copytree(FIXTURES / fixture, work)
    saved = json.loads((work / "config.json").read_text())["config"]
    logged = float(read_csv(work / "test.csv")[-1]["error"])
    for name in ("checkpoint.pt", "best.pt"):
        status, out, err = run(capsys, "--evaluate", work / name, "--data-dir", cifar_dir,
                                "--device", "cpu")
        assert status == 0, err
        error = float(out.split("test error ")[1].split("%")[0])
        assert out.startswith(f"{work / name} after epoch 1: ")
        assert error == pytest.approx(logged, abs=100 / 48 + 1e-6)
    status, out, err = run(capsys, "--resume", "--save", work, "--data-dir", cifar_dir,
                           "--device", "cpu")  # it was saved with --device auto
    assert status == 0, err
    assert f"resuming {work} after epoch 1" in out
    assert_same_numbers(work, FIXTURES / f"{fixture}-uninterrupted")
    recorded = json.loads((work / "config.json").read_text())
    assert recorded["resumes"][0]["changes"] == {
        "save": str(work), "data_dir": str(cifar_dir), "resume": True,
        **({"device": "cpu"} if saved["device"] != "cpu" else {})}


def test_a_fixed_seed_run_logs_what_the_earlier_version_logged(tmp_path, cifar_dir, capsys):
    start_run(capsys, tmp_path / "new", cifar_dir, *OLD_FLAGS)
    assert_same_numbers(tmp_path / "new", OLD_RUN_FINISHED)


def test_a_mid_epoch_checkpoint_resumed_on_other_images_is_refused(tmp_path, finished_run, capsys):
    """A checkpoint of an earlier version (no record of its images) saved at step 4 of epoch
    2, resumed on a set of images whose epoch has one step: refused before anything changes,
    instead of ending the epoch at once as if whole."""
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    state = torch.load(work / "checkpoint.pt", weights_only=True)
    del state["data"]
    state.update(epoch=1)
    state["progress"].update(step=4)
    save_checkpoint(work / "checkpoint.pt", state)
    small = write_cifar10(tmp_path / "small", train_per_batch=8)  # 40 images: one batch of 32
    before = snapshot(work)
    code, _, err = run(capsys, "--resume", "--save", work, "--data-dir", small)
    check_refused(code, err, f"{work / 'checkpoint.pt'} stopped at step 4 of epoch 2, but an epoch "
                             f"of the 40 training images found has 1 step(s)")
    assert snapshot(work) == before


def test_a_config_json_with_a_damaged_record_is_refused(tmp_path, finished_run, cifar_dir, capsys):
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    record = json.loads((work / "config.json").read_text())
    (work / "config.json").write_text(json.dumps({**record, "resumes": "yesterday"}))
    before = snapshot(work)
    code, _, err = run(capsys, "--resume", "--save", work, "--epochs", "3", "--data-dir", cifar_dir)
    check_refused(code, err, f"{work / 'config.json'} is damaged; move it away and resume again")
    assert snapshot(work) == before


@pytest.mark.parametrize("change", ["inverted pixels", "fewer images"])
def test_a_resume_on_other_images_is_refused_and_a_copy_is_not(tmp_path, finished_run, cifar_dir,
                                                               capsys, change):
    """The images are part of the run: a resume whose --data-dir holds other images (the same
    count, inverted; or fewer) is refused naming the split; the same images moved elsewhere
    resume."""
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    record = json.loads((work / "config.json").read_text())["data"]
    assert set(record) == {"train", "test"} and record["train"]["images"] == 160
    other = write_cifar10(tmp_path / "other", train_per_batch=32 if change == "inverted pixels" else 16)
    if change == "inverted pixels":
        for path in (other / "cifar-10-batches-py").glob("data_batch_*"):
            path.unlink()
        for path in (cifar_dir / "cifar-10-batches-py").glob("data_batch_*"):
            batch = pickle.loads(path.read_bytes())
            batch["data"] = 255 - batch["data"]
            (other / "cifar-10-batches-py" / path.name).write_bytes(pickle.dumps(batch))
    before = snapshot(work)
    code, _, err = run(capsys, "--resume", "--save", work, "--epochs", "3", "--data-dir", other)
    what = "fingerprint " if change == "inverted pixels" else "80 images where the run had 160"
    check_refused(code, err, f"the train images found in {other} are not those "
                             f"{work / 'checkpoint.pt'} trained on ({what}")
    assert snapshot(work) == before
    moved = shutil.copytree(cifar_dir, tmp_path / "moved")
    code, out, err = run(capsys, "--resume", "--save", work, "--epochs", "3", "--data-dir", moved)
    assert code == 0, err


def test_an_evaluation_on_other_images_never_replaces_the_runs_own(tmp_path, finished_run, cifar_dir, capsys):
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    code, out, err = run(capsys, "--evaluate", work, "--data-dir", cifar_dir)
    assert code == 0, err
    own = (work / "checkpoint-classes.csv").read_text()
    other = write_cifar10(tmp_path / "other", seed=5)
    code, out, err = run(capsys, "--evaluate", work, "--data-dir", other)
    assert code == 0, err
    named = [p.name for p in work.glob("checkpoint-classes-data*.csv")]
    assert len(named) == 1 and f"the files are named {named[0][len('checkpoint-classes'):-4]}" in out
    assert (work / "checkpoint-classes.csv").read_text() == own
    # a subset of other images: named by both, never over the subset of the run's own images
    for data in (cifar_dir, other):
        assert run(capsys, "--evaluate", work, "--data-dir", data, "--test-subset", "10")[0] == 0
    subsets = sorted(p.name for p in work.glob("checkpoint-classes-test10*.csv"))
    assert len(subsets) == 2 and subsets[0].startswith("checkpoint-classes-test10-data")
    assert subsets[1] == "checkpoint-classes-test10.csv"


def test_an_evaluation_subset_beyond_the_test_set_is_the_whole_set(tmp_path, finished_run, cifar_dir, capsys):
    """48 test images and --test-subset 5000: the whole set, said and named as such."""
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    code, out, err = run(capsys, "--evaluate", work, "--test-subset", "5000")
    assert code == 0, err
    assert "on 48 images" in out and "first 5000" not in out, out
    assert sorted(p.name for p in work.glob("checkpoint-classes*.csv")) == ["checkpoint-classes.csv"]


@pytest.mark.parametrize("flag", [["--depth", "40"], ["--seed", "1"], ["--precision", "bf16"], ["--kernels", "aten"],
                                  ["--dataset", "cifar100"], ["--resume"], ["--epochs", "3"]])
def test_evaluate_refuses_the_flags_of_training(tmp_path, finished_run, cifar_dir, capsys, flag):
    """--evaluate reads the checkpoint's settings: a training flag beside it would be ignored,
    so it is refused, and nothing is written."""
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    before = snapshot(work)
    code, _, err = run(capsys, "--evaluate", work, "--data-dir", cifar_dir, *flag)
    check_refused(code, err, f"--evaluate takes the checkpoint's own settings; {flag[0]} is a training flag: drop it")
    assert snapshot(work) == before


def test_sync_bn_on_one_process_is_refused_before_anything_is_written(tmp_path, cifar_dir, capsys):
    code, _, err = run(capsys, "--data-dir", cifar_dir, "--save", tmp_path / "run", *TINY, "--sync-bn")
    check_refused(code, err, "--sync-bn synchronises BatchNorm across torchrun's processes, and this run has one")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.slow
def test_class_names_with_commas_are_quoted_in_the_evaluation_files(tmp_path, finished_run, cifar_dir, capsys):
    data = shutil.copytree(cifar_dir, tmp_path / "data")
    meta = data / "cifar-10-batches-py" / "batches.meta"
    names = pickle.loads(meta.read_bytes())
    names["label_names"][0] = "plane, jet"
    meta.write_bytes(pickle.dumps(names))
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    code, _, err = run(capsys, "--evaluate", work, "--data-dir", data)
    assert code == 0, err
    with open(work / "checkpoint-classes.csv") as f:
        rows = list(csv.reader(f))
    assert rows[1][:2] == ["0", "plane, jet"] and len(rows[1]) == 5
    assert run_main(capsys, plot.main, work)[0] == 0


@pytest.mark.parametrize("flag", ["--save", "--evaluate", "--data-dir"])
def test_an_empty_path_is_refused_not_taken_for_the_default(tmp_path, capsys, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, flag, "")
    check_refused(code, err, f"argument {flag}: an empty path names nothing; give a path")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["val.csv", "best.pt", "test.csv"])
def test_a_folder_holding_any_file_a_run_writes_is_not_written_over(tmp_path, cifar_dir, capsys, name):
    """A user's own val.csv or best.pt: a new run there would replace it (and a run without
    --val-size would leave a stale one for the tables), so the folder is refused as a run's."""
    work = tmp_path / "mine"
    work.mkdir()
    (work / name).write_text("the user's own\n")
    before = snapshot(work)
    status, _, err = run(capsys, "--data-dir", cifar_dir, "--save", work, *TINY, "--epochs", "1")
    check_refused(status, err, f"{work} holds files a run writes ({name}) but no run; move them, or "
                               f"choose another --save DIR")
    status, _, err = run(capsys, "--data-dir", cifar_dir, "--save", work, *TINY, "--epochs", "1", "--resume")
    check_refused(status, err, f"{work} holds no run to resume (no checkpoint.pt or config.json); "
                               f"move the files a run writes out of it")
    assert snapshot(work) == before
