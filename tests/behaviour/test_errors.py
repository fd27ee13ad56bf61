"""Every mistake a user can make: one line that says what to do, non-zero exit, nothing changed.

The table runs each bad input through a script's ``main`` in this process (the same code
the command runs, without a second start-up of torch), a few through the real command
line, and compares a hash of every file around before and after.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import plot
import train
from attic import dataset_stats, gradcheck, lr_find, predict, summary
from bench import kernels as kernel_count
from bench import memory, pipeline, profile, speed
from densenet import DenseNet
from densenet_trainer.config import cli
from densenet_trainer.config.run_config import RunConfig
from helpers import (
    ROOT,
    TINY,
    TINY_MODEL,
    Payload,
    check_refused,
    run_cli,
    run_main,
    snapshot,
    write_cifar10,
)

SCRIPTS = {"train.py": train.main, "plot.py": plot.main, "attic/summary.py": summary.main,
           "attic/gradcheck.py": gradcheck.main, "attic/dataset_stats.py": dataset_stats.main,
           "attic/lr_find.py": lr_find.main, "bench/speed.py": speed.main,
           "bench/memory.py": memory.main, "bench/pipeline.py": pipeline.main,
           "attic/predict.py": predict.main, "bench/kernels.py": kernel_count.main,
           "bench/profile.py": profile.main}


# ---------------------------------------------------------------- what the cases start from

def plot_run(tmp: Path) -> Path:
    """A work directory as train.py leaves it, for plot.py."""
    folder = tmp / "plotted"
    folder.mkdir()
    (folder / "train.csv").write_text("epoch,lr,loss,error,seconds,images_per_s\n1,0.1,2.0,80,1,9\n"
                                      "2,0.1,1.5,60,1,9\n")
    (folder / "test.csv").write_text("epoch,loss,error,seconds\n1,2.1,81,0.1\n2,1.6,62,0.1\n")
    (folder / "config.json").write_text('{"parameters": 2666}')
    return folder


def make_git(tmp: Path, data: Path) -> None:
    (tmp / ".git").mkdir()


def own_file(name: str):
    """A damage: a file of the user's own, named as one a run writes, in tmp/mine."""
    def write(tmp: Path, data: Path) -> None:
        (tmp / "mine").mkdir()
        (tmp / "mine" / name).write_text("mine\n")
    return write


def damage_labels(tmp: Path, data: Path) -> None:
    path = data / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "rb") as f:
        content = pickle.load(f)
    content["labels"][3] = 12
    with open(path, "wb") as f:
        pickle.dump(content, f)


def swap_architecture(tmp: Path, run: Path) -> None:
    """The checkpoint's weights from a deeper model, its config unchanged."""
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["model"] = DenseNet(16, 4).state_dict()
    torch.save(state, run / "checkpoint.pt")


def from_another_run(tmp: Path, run: Path) -> None:
    """checkpoint.pt replaced by another run's: another identity, another seed."""
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["run_id"], state["config"]["seed"] = "0" * 32, 5
    torch.save(state, run / "checkpoint.pt")


def flip_a_bit(tmp: Path, run: Path) -> None:
    """One bit flipped inside the largest tensor of checkpoint.pt; the archive still opens."""
    path = run / "checkpoint.pt"
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    content = bytearray(path.read_bytes())
    header = entry.header_offset
    name_length, extra_length = struct.unpack("<HH", content[header + 26:header + 30])
    content[header + 30 + name_length + extra_length + entry.file_size // 2] ^= 0x10
    path.write_bytes(bytes(content))


def huge_image(tmp: Path, run: Path) -> None:
    """A 56-megapixel PNG (small on disk: one colour)."""
    from PIL import Image
    Image.new("1", (8000, 7000)).save(tmp / "huge.png")


def hold_lock(tmp: Path, run: Path, stack: contextlib.ExitStack) -> None:
    """Another holder of the run's lock (an open file description of its own, as another
    process would have), named as train.py names itself."""
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    stack.callback(os.close, fd)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, b"pid 4242 on elsewhere since 2026-11-25 10:00:00 (train.py --save run)")
    stack.callback(os.unlink, run / ".lock")


def write(relative: str, content: bytes | str):
    def setup(tmp: Path, target: Path) -> None:
        path = target / relative
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def delete(relative: str):
    return lambda tmp, target: (target / relative).unlink()


# (script, arguments, message, what the case starts from, how it is damaged)
# {data}: a copy of the generated CIFAR-10; {run}: a copy of the finished run; {plotted}: a
# run for plot.py; {tmp}: the case's own folder, also the working directory.
TOO_LONG_NAME = "a" * 300  # a file name takes at most 255 bytes
TOO_LONG_PATH = "/".join(["b" * 200] * 25)  # 5,024 bytes; a path takes at most 4,095
CASES = {
    # train.py: flags
    "depth 41": ("train.py", "--depth 41 --save {tmp}/r", "depth 41 is impossible for DenseNet-BC (bottleneck): depth - 4 must be a positive multiple of 6; nearest valid depths: 40 or 46", None, None),
    "depth not a number": ("train.py", "--depth ten", "argument --depth: invalid int value: 'ten'", None, None),
    "lr 0": ("train.py", "--lr 0", "argument --lr: must be a positive number, got 0", None, None),
    "lr nan": ("train.py", "--lr nan", "argument --lr: must be a finite number, got nan", None, None),
    "epochs 0": ("train.py", "--epochs 0", "argument --epochs: must be a positive integer, got 0", None, None),
    "batch size -4": ("train.py", "--batch-size -4", "argument --batch-size: must be a positive integer, got -4", None, None),
    "seed -1": ("train.py", "--seed -1", "argument --seed: must be between 0 and 4294967295, got -1", None, None),
    "seed 2**70": ("train.py", f"--seed {2**70}", "argument --seed: must be between 0 and 4294967295", None, None),
    "momentum -1": ("train.py", "--momentum -1", "argument --momentum: must be in [0, 1), got -1", None, None),
    "momentum nan": ("train.py", "--momentum nan", "argument --momentum: must be a finite number", None, None),
    "weight decay nan": ("train.py", "--weight-decay nan", "argument --weight-decay: must be a finite number", None, None),
    "unknown dataset": ("train.py", "--dataset mnist", "invalid choice: 'mnist'", None, None),
    "tta alone": ("train.py", "--tta", "--tta only applies with --evaluate CHECKPOINT", None, None),
    "save name too long": ("train.py", "--save {tmp}/" + TOO_LONG_NAME, f"argument --save: the name {TOO_LONG_NAME[:24]}... is 300 bytes long; a file or folder name takes at most 255", None, None),
    "data dir path too long": ("train.py", f"--data-dir {TOO_LONG_PATH}", "argument --data-dir: the path is 5,024 bytes long; the system takes at most 4,095", None, None),
    "evaluate path too long": ("train.py", f"--evaluate {TOO_LONG_PATH}", "argument --evaluate: the path is 5,024 bytes long", None, None),
    "lr past float32": ("train.py", "--lr 1e39 --save {tmp}/r", "argument --lr: must be at most 3.4e+38 (the largest float32 number), got 1e+39", None, None),
    "lr below float32": ("train.py", "--lr 1e-300 --save {tmp}/r", "argument --lr: must be 0 or at least 1.18e-38 (the smallest float32 number), got 1e-300", None, None),
    "weight decay past float32": ("train.py", "--weight-decay 1e39 --save {tmp}/r", "argument --weight-decay: must be at most 3.4e+38", None, None),
    "lr finder end past float32": ("attic/lr_find.py", "--end-lr 1e300 --save {tmp}/sweep", "argument --end-lr: must be at most 3.4e+38", None, None),
    "absurd depth": ("train.py", "--depth 600000000000000000004 --save {tmp}/r", "this DenseNet would have 18,840,000,000,000,000,001,659,600,000,000,000,000,000,706 parameters", None, None),
    "summary of an absurd depth": ("attic/summary.py", "--depth 600000000000000000004", "this DenseNet would have 18,840,000,000,000,000,001,659,600,000,000,000,000,000,706 parameters", None, None),
    "plot watch past float": ("plot.py", "{plotted} --watch 1e300", "argument --watch: must be at most 3.4e+38", "plotted", None),
    "enormous growth rate": ("train.py", "--growth-rate 100000", "this DenseNet would have 51,465,233,800,010 parameters (766,892 GiB with gradients and optimiser state, before any activation); at most 1,000,000,000 are built", None, None),
    "compression leaves no channels": ("train.py", "--depth 10 --growth-rate 4 --compression 0.01 --save {tmp}/r", "compression 0.01 leaves transition 1 no channels (floor(0.01 x 12) = 0); use at least 0.0833", None, None),
    "resume another run's checkpoint": ("train.py", "--resume --save {run} --epochs 3", "{run}/checkpoint.pt is not the run recorded in {run}/config.json (it is run 00000000000000000000000000000000, the folder's config.json is run ", "run", from_another_run),
    "evaluate another run's checkpoint": ("train.py", "--evaluate {run}", "{run}/checkpoint.pt is not the run recorded in {run}/config.json", "run", from_another_run),
    "predict with another run's checkpoint": ("attic/predict.py", "{run} {tmp}/cat.png", "{run}/checkpoint.pt is not the run recorded in {run}/config.json", "run", from_another_run),
    "resume a flipped bit": ("train.py", "--resume --save {run} --epochs 3", "{run}/checkpoint.pt is damaged: its entry ", "run", flip_a_bit),
    "evaluate a flipped bit": ("train.py", "--evaluate {run}/checkpoint.pt", "does not match its checksum (a changed or flipped byte)", "run", flip_a_bit),
    "reschedule alone": ("train.py", "--reschedule", "--reschedule only applies with --resume", None, None),
    "compression 0": ("train.py", "--compression 0", "compression must be in (0, 1], got 0.0", None, None),
    # train.py: data
    "data absent": ("train.py", "--data-dir {tmp}/nothing --no-download --save {tmp}/r", "cifar10 is not in {tmp}/nothing/cifar-10-batches-py; point --data-dir at the folder that holds cifar-10-batches-py/", None, None),
    "labels out of range": ("train.py", "--data-dir {data} --save {tmp}/r " + " ".join(TINY), "data_batch_2 has labels outside 0-9 (such as 12); replace it with a fresh copy", "data", damage_labels),
    "corrupt data file": ("train.py", "--data-dir {data} --save {tmp}/r " + " ".join(TINY), "data_batch_3 is not a readable CIFAR python file", "data", write("cifar-10-batches-py/data_batch_3", b"\x80\x04not a pickle")),
    "validation too large": ("train.py", "--data-dir {data} --save {tmp}/r --val-size 500 " + " ".join(TINY), "--val-size must be between 1 and 159, got 500", "data", None),
    "fewer images than a batch": ("train.py", "--data-dir {data} --save {tmp}/r --train-subset 10 " + " ".join(TINY), "the training set has 10 images, fewer than one batch of 32", "data", None),
    # train.py: work directories
    "save under a file": ("train.py", "--data-dir {data} --save {tmp}/a-file/r " + " ".join(TINY), "cannot write to {tmp}/a-file/r", "data", lambda tmp, data: (tmp / "a-file").write_text("x")),
    "run exists": ("train.py", "--data-dir {data} --save {run} " + " ".join(TINY), "{run} already holds a run; continue it with --resume", "run", None),
    "resume nothing": ("train.py", "--resume --save {tmp}", "holds no run to resume (no checkpoint.pt or config.json)", None, None),
    "resume contradicting flag": ("train.py", "--resume --save {run} --depth 16", "--resume: --depth 16 (the run has 10) would change the run in {run}", "run", None),
    "resume without checkpoint": ("train.py", "--resume --save {run}", "{run} has epochs logged in train.csv but no checkpoint.pt to continue from", "run", delete("checkpoint.pt")),
    "resume rows missing": ("train.py", "--resume --save {run} --epochs 3 --reschedule", "{run}/test.csv does not hold a row for each of the epochs 1-2", "run", write("test.csv", "epoch,loss,error,seconds\n1,2,80,1\n")),
    "resume damaged header": ("train.py", "--resume --save {run} --epochs 3 --reschedule", "{run}/train.csv does not start with the header", "run", write("train.csv", "garbage\n")),
    "resume damaged config.json": ("train.py", "--resume --save {run} --epochs 3", "{run}/config.json is damaged; move it away and resume again", "run", write("config.json", "[1, 2]")),
    "resume truncated checkpoint": ("train.py", "--resume --save {run} --epochs 3", "{run}/checkpoint.pt is truncated or corrupt", "run", lambda tmp, run: (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:5000])),
    "resume other architecture": ("train.py", "--resume --save {run} --epochs 3 --reschedule", "{run}/checkpoint.pt does not fit the model its own config describes (", "run", swap_architecture),
    "resume shortens": ("train.py", "--resume --save {run} --epochs 1", "--epochs 1: the run in {run} has trained 2 of its 2 epochs and cannot be shortened to 1", "run", None),
    "resume jumps the lr": ("train.py", "--resume --save {run} --epochs 4", "--epochs 4 would raise the learning rate: the 2 epoch(s) trained followed the schedule of --epochs 2, the last at lr 0.001; under --epochs 4, epoch 3 trains at lr 0.01; add --reschedule", "run", None),
    "resume a busy run": ("train.py", "--resume --save {run} --epochs 3 --reschedule", "{run} is in use by pid 4242 on elsewhere since 2026-11-25 10:00:00 (train.py --save run): wait for it to end or stop it, or choose another with --save", "run", "lock"),
    "evaluate missing": ("train.py", "--evaluate {tmp}/nope.pt", "no checkpoint file at {tmp}/nope.pt", None, None),
    "evaluate other architecture": ("train.py", "--evaluate {run}/checkpoint.pt --data-dir {data}", "{run}/checkpoint.pt does not fit the model its own config describes", "run", swap_architecture),
    "evaluate a busy run": ("train.py", "--evaluate {run}/checkpoint.pt --data-dir {data}", "{run} is in use by pid 4242", "run", "lock"),
    # plot.py
    "plot missing folder": ("plot.py", "{tmp}/missing", "{tmp}/missing does not exist", None, None),
    "plot not a run": ("plot.py", "{tmp}", "{tmp} holds no train.csv: it is not a train.py work directory", None, None),
    "plot config is a list": ("plot.py", "{plotted}", "{plotted}/config.json holds no JSON object", "plotted", write("config.json", "[1, 2]")),
    "plot parameters a string": ("plot.py", "{plotted}", "{plotted}/config.json has a parameter count that is not a whole number", "plotted", write("config.json", '{"parameters": "many"}')),
    "plot non-UTF-8 CSV": ("plot.py", "{plotted}", "{plotted}/train.csv cannot be read", "plotted", write("train.csv", b"epoch,loss,error\n1,\xff\xfe,3\n")),
    "plot all-NaN column": ("plot.py", "{plotted}", "{plotted}/test.csv, line 2: loss is 'nan', not a finite number; repair it or move it away", "plotted", write("test.csv", "epoch,loss,error,seconds\n1,nan,81,0.1\n2,nan,62,0.1\n")),
    "plot trailing commas": ("plot.py", "{plotted}", "{plotted}/test.csv, line 2: 5 fields where the header has 4", "plotted", write("test.csv", "epoch,loss,error,seconds\n1,2.3,79.69,0.30,\n2,2.1,70.1,0.31,\n")),
    "plot a field too many": ("plot.py", "{plotted}", "{plotted}/test.csv, line 2: 5 fields where the header has 4", "plotted", write("test.csv", "epoch,loss,error,seconds\n1,2.3,79.69,0.30,9\n2,2.1,70.1,0.31\n")),
    "plot infinite epoch": ("plot.py", "{plotted}", "{plotted}/test.csv, line 3: epoch is 'inf', not a finite number", "plotted", write("test.csv", "epoch,loss,error,seconds\n1,2.3,79.69,0.30\ninf,2.1,70.1,0.31\n")),
    "plot epochs out of order": ("plot.py", "{plotted}", "{plotted}/train.csv, line 3: epoch 3 where 2 comes next", "plotted", write("train.csv", "epoch,lr,loss,error\n1,0.1,2.3,50\n3,0.1,2.2,49\n")),
    "resume a row with fields missing": ("train.py", "--resume --save {run} --epochs 3", "{run}/train.csv, line 3: 4 fields where the header has 6", "run", lambda tmp, run: (run / "train.csv").write_text("\n".join((run / "train.csv").read_text().splitlines()[:2] + ["2,0.1,2.3,50"]) + "\n")),
    "plot a binary style file": ("plot.py", "{plotted} --style {tmp}/binary.style", "--style {tmp}/binary.style is not a matplotlib style file", "plotted", lambda tmp, run: (tmp / "binary.style").write_bytes(bytes(range(256)))),
    "bench speed one not json": ("bench/speed.py", "--one {{oops", "--one is internal: it takes the JSON settings the script hands its own processes", None, None),
    "bench speed one unknown mode": ("bench/speed.py", '--one {{"mode":"nope","depth":10,"growth_rate":4,"batch":8,"device":"cpu","steps":1,"warmup":0}}', "--one is internal", None, None),
    "bench memory one a list": ("bench/memory.py", "--one [1]", "--one is internal", None, None),
    "plot non-numeric": ("plot.py", "{plotted}", "{plotted}/train.csv, line 2: loss is 'abc', not a finite number", "plotted", write("train.csv", "epoch,lr,loss,error\n1,0.1,abc,50\n")),
    "plot no loss column": ("plot.py", "{plotted}", "{plotted}/train.csv lacks the column(s) loss", "plotted", write("train.csv", "epoch,error\n1,50\n")),
    "plot dpi 0": ("plot.py", "{plotted} --dpi 0", "argument --dpi: must be between 10 and 1200, got 0", "plotted", None),
    "plot out into a missing folder": ("plot.py", "{plotted} {plotted} --out {tmp}/nowhere/c.png", "--out {tmp}/nowhere/c.png: the folder {tmp}/nowhere does not exist", "plotted", None),
    "plot out unknown suffix": ("plot.py", "{plotted} {plotted} --out {tmp}/c.xyz", "unknown figure format '.xyz'", "plotted", None),
    "plot out unwritable": ("plot.py", "{plotted} {tmp}/plotted2 --out /proc/c.png", "cannot write", "plotted",
                            lambda tmp, run: shutil.copytree(run, tmp / "plotted2")),
    "plot corrupt lr_find.json": ("plot.py", "{plotted}", "{plotted}/lr_find.json is not readable JSON", "plotted", lambda tmp, run: [(run / "lr_find.csv").write_text("step,lr,raw_loss,loss\n1,0.001,2.3,2.3\n"), (run / "lr_find.json").write_text("{oops")]),
    "plot corrupt lr_find.csv": ("plot.py", "{plotted}", "{plotted}/lr_find.csv lacks the column(s) loss", "plotted", write("lr_find.csv", "step,lr\n1,0.1\n")),
    "plot path too long": ("plot.py", TOO_LONG_PATH, "argument WORKDIR: the path is 5,024 bytes long", None, None),
    "plot confusion with an empty cell": ("plot.py", "{plotted}", "{plotted}/checkpoint-confusion.csv is not a square confusion matrix of counts", "plotted", write("checkpoint-confusion.csv", "true\\predicted,a,b\na,1,\nb,2,3\n")),
    "plot confusion overflowing": ("plot.py", "{plotted}", "{plotted}/checkpoint-confusion.csv is not a square confusion matrix of counts", "plotted", write("checkpoint-confusion.csv", "true\\predicted,a,b\na,1,1e400\nb,2,3\n")),
    "summary enormous growth rate": ("attic/summary.py", "--growth-rate 100000", "this DenseNet would have 51,465,233,800,010 parameters", None, None),
    "predict a huge image": ("attic/predict.py", "{run} {tmp}/huge.png", "{tmp}/huge.png is 8000x7000 pixels, more than the 50 megapixels this reads; shrink it first", "run", huge_image),
    "plot corrupt confusion": ("plot.py", "{plotted}", "{plotted}/checkpoint-confusion.csv is not a square confusion matrix", "plotted", write("checkpoint-confusion.csv", "true\\predicted,a,b\na,1,x\nb,2\n")),
    "plot watch negative": ("plot.py", "{plotted} --watch -1", "argument --watch: must be 0 or more, got -1", "plotted", None),
    # attic/
    "summary depth 11": ("attic/summary.py", "--depth 11", "depth 11 is impossible for DenseNet-BC (bottleneck)", None, None),
    "summary growth rate 0": ("attic/summary.py", "--growth-rate 0", "growth rate must be a positive integer, got 0", None, None),
    "summary image suffix": ("attic/summary.py", "--depth 10 --image {tmp}/arch.xyz", "--image {tmp}/arch.xyz: the name must end in .png, .pdf or .svg", None, None),
    "summary image unwritable": ("attic/summary.py", "--depth 10 --growth-rate 4 --image /proc/arch.png", "cannot write /proc/arch.png", None, None),
    "gradcheck growth rate 0": ("attic/gradcheck.py", "--growth-rate 0", "argument --growth-rate: must be a positive integer, got 0", None, None),
    "dataset stats data absent": ("attic/dataset_stats.py", "--data-dir {tmp}/nothing --no-download", "cifar10 is not in {tmp}/nothing/cifar-10-batches-py", None, None),
    "lr_find depth 11": ("attic/lr_find.py", "--depth 11 --data-dir {data}", "depth 11 is impossible", "data", None),
    "lr_find batch size 0": ("attic/lr_find.py", "--batch-size 0 --data-dir {data}", "argument --batch-size: must be a positive integer, got 0", "data", None),
    "lr_find steps 2": ("attic/lr_find.py", "--steps 2 --data-dir {data}", "argument --steps: must be at least 3, got 2", "data", None),
    "lr_find lrs reversed": ("attic/lr_find.py", "--start-lr 1 --end-lr 0.1 --data-dir {data}", "--start-lr 1 must be below --end-lr 0.1", "data", None),
    "lr_find data absent": ("attic/lr_find.py", "--data-dir {tmp}/nothing --no-download " + " ".join(TINY_MODEL), "cifar10 is not in {tmp}/nothing/cifar-10-batches-py", None, None),
    "lr_find into a training run": ("attic/lr_find.py", "--data-dir {data} --save {run} --steps 3 " + " ".join(TINY_MODEL), "{run} holds a training run; the sweep goes into a folder of its own: choose another --save", "run", None),
    "lr_find unwritable save": ("attic/lr_find.py", "--data-dir {data} --save /proc/sweep --steps 3 " + " ".join(TINY_MODEL), "cannot write to /proc/sweep", "data", None),
    "lr_find into a busy training run": ("attic/lr_find.py", "--data-dir {data} --save {run} --steps 3 " + " ".join(TINY_MODEL), "{run} holds a training run; the sweep goes into a folder of its own", "run", "lock"),
    # bench/
    "speed depth 11": ("bench/speed.py", "--depth 11", "depth 11 is impossible", None, None),
    "speed repeats 0": ("bench/speed.py", "--repeats 0", "argument --repeats: must be a positive integer, got 0", None, None),
    "speed steps 0": ("bench/speed.py", "--steps 0", "argument --steps: must be a positive integer, got 0", None, None),
    "speed batch 0": ("bench/speed.py", "--batch 0", "argument --batch: must be a positive integer, got 0", None, None),
    "speed unknown mode": ("bench/speed.py", "--modes ours,fastest", "unknown mode(s) fastest", None, None),
    "profile unknown path": ("bench/profile.py", "--paths aten,fastest", "unknown path(s) fastest", None, None),
    "profile depth 11": ("bench/profile.py", "--depth 11", "depth 11 is impossible", None, None),
    "profile one not json": ("bench/profile.py", "--one {{oops", "--one is internal", None, None),
    "speed graph on a cpu": ("bench/speed.py", "--device cpu --modes ours,graph_bf16", "mode(s) graph_bf16 capture a CUDA graph and need --device cuda", None, None),
    "memory repeats 0": ("bench/memory.py", "--repeats 0", "argument --repeats: must be a positive integer, got 0", None, None),
    "memory threads 0": ("bench/memory.py", "--threads 0", "argument --threads: must be a positive integer, got 0", None, None),
    "kernels depth 11": ("bench/kernels.py", "--depth 11", "depth 11 is impossible", None, None),
    "kernels batch 0": ("bench/kernels.py", "--batch 0", "argument --batch: must be a positive integer, got 0", None, None),
    "kernels unknown path": ("bench/kernels.py", "--paths aten,fastest", "--paths: unknown fastest; choose from aten, fused", None, None),
    "pipeline steps 0": ("bench/pipeline.py", "--steps 0", "argument --steps: must be a positive integer, got 0", None, None),
    "pipeline depth 11": ("bench/pipeline.py", "--depth 11", "depth 11 is impossible", None, None),
    "pipeline data absent": ("bench/pipeline.py", "--data-dir {tmp}/nothing --no-download " + " ".join(TINY), "cifar10 is not in {tmp}/nothing/cifar-10-batches-py", None, None),
    # a folder that is not a run's to write in
    "train into .git": ("train.py", "--data-dir {data} --save {tmp}/.git/run " + " ".join(TINY), "{tmp}/.git/run is inside a .git folder, which is git's own", "data", make_git),
    "train into the data folder": ("train.py", "--data-dir {data} --save {data} " + " ".join(TINY), "{tmp}/data is where the images are read from (--data-dir {tmp}/data)", "data", None),
    "train into the dataset's folder": ("train.py", "--data-dir {data} --save {data}/cifar-10-batches-py/run " + " ".join(TINY), "is where the images are read from", "data", None),
    "train over a .lock of the user's": ("train.py", "--data-dir {data} --save {tmp}/mine " + " ".join(TINY), "{tmp}/mine/.lock is not a lock file of this trainer; move it", "data", own_file(".lock")),
    "train over evaluation files": ("train.py", "--data-dir {data} --save {tmp}/mine " + " ".join(TINY), "holds files a run writes (checkpoint-classes.csv) but no run", "data", own_file("checkpoint-classes.csv")),
    "plot --out with one run": ("plot.py", "{plotted} --out {tmp}", "--out does nothing with one run's figures (they go into its folder)", "plotted", None),
    "plot --out of a missing folder": ("plot.py", "{plotted} {tmp}/other --out {tmp}/nothing/", "--out {tmp}/nothing/: no such folder", "plotted", None),
    "plot --out and --format disagree": ("plot.py", "{plotted} {tmp}/other --out {tmp}/c.pdf --format svg", "is a .pdf file and --format says svg: give one", "plotted", None),
    "plot --table of a run without its configuration": ("plot.py", "--table {plotted}", "{tmp}/plotted: its config.json holds no configuration", "plotted", None),
}
if not torch.cuda.is_available():
    CASES["speed on a missing GPU"] = ("bench/speed.py", "--device cuda", "argument --device: no CUDA GPU is visible; use --device cpu", None, None)
    CASES["train on a missing GPU"] = ("train.py", "--device cuda", "--device cuda: no CUDA GPU is visible; use --device cpu", None, None)
# these also go through the real command line: the scripts' entry points end in one line too
THROUGH_THE_COMMAND_LINE = {"seed -1", "labels out of range", "plot all-NaN column",
                            "summary depth 11", "speed repeats 0", "lr_find depth 11"}


def prepare(case: str, tmp: Path, cifar_dir: Path, finished_run: Path,
            stack: contextlib.ExitStack) -> list[str]:
    script, arguments, message, start, damage = CASES[case]
    places = {"tmp": tmp, "data": tmp / "data", "run": tmp / "run", "plotted": tmp / "plotted"}
    if start == "data":
        shutil.copytree(cifar_dir, places["data"])
    elif start == "run":
        shutil.copytree(finished_run, places["run"])
        shutil.copytree(cifar_dir, places["data"])
    elif start == "plotted":
        plot_run(tmp)
    if damage == "lock":
        hold_lock(tmp, places["run"], stack)
    elif damage is not None:
        damage(tmp, places[start])
    return [part.format(**places) for part in arguments.split()]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_nothing_changed(case, tmp_path, cifar_dir, finished_run, capsys,
                                            monkeypatch):
    script, _, message, _, _ = CASES[case]
    monkeypatch.chdir(tmp_path)  # where defaults such as work/ would land
    with contextlib.ExitStack() as stack:
        argv = prepare(case, tmp_path, cifar_dir, finished_run, stack)
        before = snapshot(tmp_path)
        code, _, stderr = run_main(capsys, SCRIPTS[script], *argv)
        check_refused(code, stderr, message.format(tmp=tmp_path, run=tmp_path / "run",
                                                   plotted=tmp_path / "plotted"))
        assert snapshot(tmp_path) == before
        if case in THROUGH_THE_COMMAND_LINE:
            result = run_cli(script, *argv, cwd=tmp_path)
            check_refused(result.returncode, result.stderr,
                          message.format(tmp=tmp_path, run=tmp_path / "run", plotted=tmp_path / "plotted"))
            assert snapshot(tmp_path) == before


def test_the_table_is_large_enough():
    scripts = {CASES[case][0].split("/")[0] for case in CASES}
    assert len(CASES) >= 30 and scripts == {"train.py", "plot.py", "attic", "bench"}


def test_malicious_dataset_pickle_cannot_run_code(tmp_path, capsys):
    data = write_cifar10(tmp_path / "data")
    marker = tmp_path / "pwned"
    (data / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Payload(marker)}))
    code = train.main(["--data-dir", str(data), "--save", str(tmp_path / "run"), *TINY])
    check_refused(code, capsys.readouterr().err, "unexpected object")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, finished_run, cifar_dir, capsys):
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    marker = tmp_path / "pwned"
    state = torch.load(work / "checkpoint.pt", weights_only=True)
    state["model"]["evil"] = Payload(marker)
    torch.save(state, work / "checkpoint.pt")
    before = snapshot(work)
    for command in (["--resume", "--save", work, "--epochs", "3", "--reschedule"],
                    ["--evaluate", work / "checkpoint.pt"]):
        code = train.main([*map(str, command), "--data-dir", str(cifar_dir)])
        check_refused(code, capsys.readouterr().err, f"refusing to load {work / 'checkpoint.pt'}: "
                                                     f"it holds objects other than tensors and plain data")
    assert not marker.exists()
    assert snapshot(work) == before


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` unwritable, even for root (immutable attribute), while the block runs."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    elif os.system(f"chattr +i '{folder}' 2>/dev/null") == 0:
        undo = ["chattr", "-i", str(folder)]
    else:
        pytest.skip("running as root where chattr +i does not work: cannot make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_read_only_folders_are_refused_before_any_work(tmp_path, finished_run, cifar_dir, capsys):
    work, sweep = tmp_path / "run", tmp_path / "sweep"
    shutil.copytree(finished_run, work)
    sweep.mkdir()
    before = snapshot(tmp_path)
    with read_only(work), read_only(sweep):
        for argv in (["--evaluate", work / "checkpoint.pt"],
                     ["--resume", "--save", work, "--epochs", "3", "--reschedule"]):
            code = train.main([*map(str, argv), "--data-dir", str(cifar_dir)])
            check_refused(code, capsys.readouterr().err, f"cannot write to {work} (")
        code = lr_find.main(["--data-dir", str(cifar_dir), "--save", str(sweep), "--steps", "3", *TINY_MODEL])
        check_refused(code, capsys.readouterr().err, f"cannot write to {sweep} (")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_data_absent_offline_download_fails(tmp_path):
    result = run_cli("train.py", "--data-dir", tmp_path / "nothing", "--save", tmp_path / "run",
                     env={"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})
    check_refused(result.returncode, result.stderr, "could not be downloaded")
    assert "point --data-dir at the folder that holds cifar-10-batches-py/" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_disk_full_while_saving_loses_nothing(tmp_path, finished_run, cifar_dir):
    """Files may not grow past 50 kB (RLIMIT_FSIZE): the rows of epoch 3 fit, its checkpoint
    does not. The run stops in one line, keeps the checkpoint of epoch 2, and resumes."""
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    checkpoint = (work / "checkpoint.pt").read_bytes()
    assert len(checkpoint) > 50_000

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))

    resume = [sys.executable, str(ROOT / "train.py"), "--resume", "--save", str(work),
              "--epochs", "3", "--reschedule", "--data-dir", str(cifar_dir)]
    full = subprocess.run(resume, capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    check_refused(full.returncode, full.stderr, f"cannot write {work / 'checkpoint.pt'} (File too large); "
                                                f"free space (or fix permissions), then continue from the "
                                                f"last checkpoint with --resume --save {work}")
    assert (work / "checkpoint.pt").read_bytes() == checkpoint
    assert not list(work.glob(".*.tmp"))
    assert train.main(resume[2:]) == 0  # with space again
    assert [line.split(",")[0] for line in (work / "train.csv").read_text().splitlines()] == \
        ["epoch", "1", "2", "3"]
    assert not math.isnan(float((work / "test.csv").read_text().splitlines()[-1].split(",")[1]))


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_gives_every_flag_a_text_and_its_default(script, monkeypatch):
    """Each script's own flags, each with help and its default (0 included): argparse's for
    a script's own flags, the setting's own (config.RunConfig) for the flags of a run's
    settings, which have none in argparse. The tools built on a run's settings offer only
    those they use: none that resume, stop or evaluate a run."""
    parsers = []

    def capture(parser, *args, **kwargs):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(cli.OneLineParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        SCRIPTS[script](["--help"])
    parser = parsers[0]
    formatter = parser.formatter_class(parser.prog)
    settings = {f.name: f.default for f in fields(RunConfig)}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{script}: {action.option_strings or action.dest} has no help text"
        if action.default == argparse.SUPPRESS:  # a run's setting: its default is RunConfig's
            default = settings[action.dest]
            if default is not None and default is not False:
                assert action.help.endswith(f" (default: {default})"), (script, action.dest)
        elif action.default is not None and action.default is not False:
            assert "%(default)" in formatter._get_help_string(action), (script, action.dest)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    run_only = {"--resume", "--stop-after", "--reschedule", "--evaluate", "--tta"}
    if script in ("attic/lr_find.py", "bench/pipeline.py"):
        assert not flags & run_only
    if script == "attic/lr_find.py":  # it neither schedules nor evaluates
        assert not flags & {"--epochs", "--lr", "--schedule", "--test-subset", "--eval-batch-size"}
        save = next(a for a in parser._actions if "--save" in a.option_strings)
        assert "lr-find" in save.help
    if script == "train.py":
        assert run_only <= flags
