"""The checkpoint format (checkpoint.py): what restore puts back and what it keeps (the
optimiser's implementation, its step counts where it reads them, the run's learning rate),
the best-epoch record, a checkpoint refused where it is not its folder's run."""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from densenet_trainer.config.cli import UserError
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.loop.training import EpochProgress, LearningRate, build_optimizer
from densenet_trainer.random_state import rng_state
from densenet_trainer.run.checkpoint import CHECKPOINT_KEYS, BestEpochs, Checkpoint, restore
from densenet_trainer.run.files import RunError, save_checkpoint, write_json
from helpers import make_step, train_steps


def test_a_restored_optimizer_keeps_its_fused_implementation(tmp_path):
    """A checkpoint of an earlier version (foreach SGD) resumes with the fused kernel, its
    momentum buffers and the run's own learning-rate tensor."""
    step = make_step(torch.device("cpu"))
    earlier = torch.optim.SGD(step.model.parameters(), 0.1, momentum=0.9, nesterov=True,
                              weight_decay=1e-4, foreach=True)
    train_steps(step, step, 1)
    earlier.step()  # momentum buffers from the gradients the step left
    lr = step.optimizer.param_groups[0]["lr"]
    restore(step.optimizer, earlier.state_dict(), tmp_path / "checkpoint.pt")
    group = step.optimizer.param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    assert group["lr"] is lr  # the run's LearningRate, which the schedule sets
    for p in step.model.parameters():
        assert torch.equal(step.optimizer.state[p]["momentum_buffer"], earlier.state[p]["momentum_buffer"])


@pytest.mark.parametrize("opt", ["adam", "rmsprop"])
def test_step_counts_move_to_where_the_resumed_optimiser_reads_them(opt):
    """Trained without the graph (RMSprop keeps its step counts on the CPU then) and resumed
    with it, on a GPU (the meta device stands in): the counts move to the parameters' device,
    where a capturable optimiser reads them; a resume without the graph keeps them as its
    implementation reads them."""
    cfg = RunConfig(opt=opt)
    trained = build_optimizer(cfg, model := torch.nn.Linear(3, 2), LearningRate(cfg.lr, torch.device("cpu")))
    model(torch.ones(1, 3)).sum().backward()
    trained.step()
    kind = torch.optim.Adam if opt == "adam" else torch.optim.RMSprop
    graphed = kind(torch.nn.Linear(3, 2, device="meta").parameters(), capturable=True)
    restore(graphed, trained.state_dict(), "checkpoint.pt")
    assert graphed.param_groups[0]["capturable"]
    assert [s["step"].device.type for s in graphed.state.values()] == ["meta", "meta"]
    eager = build_optimizer(cfg, torch.nn.Linear(3, 2), LearningRate(cfg.lr, torch.device("cpu")))
    restore(eager, trained.state_dict(), "checkpoint.pt")
    assert [s["step"].dtype for s in eager.state.values()] == [torch.float32] * 2


def test_the_best_epochs_record_keeps_the_lowest_errors_and_its_checkpoint_form():
    """The lowest test error's epoch and, once a validation split exists, the lowest
    validation error's (whether best.pt is to be replaced); a tie keeps the earlier epoch."""
    best = BestEpochs()
    assert best.state() == {"error": math.inf, "epoch": 0}  # as earlier versions saved it
    assert not best.update(1, 40.0, None) and best == BestEpochs(40.0, 1)
    assert best.update(2, 45.0, 30.0) and best == BestEpochs(40.0, 1, 30.0, 2)
    assert not best.update(3, 35.0, 30.0) and best == BestEpochs(35.0, 3, 30.0, 2)
    assert best.update(4, 36.0, 29.0)
    assert BestEpochs.from_state(best.state()) == best == BestEpochs(35.0, 3, 29.0, 4)


def write_checkpoint(folder: Path, run_id: str, **config) -> Path:
    """A checkpoint of this trainer's format (every CHECKPOINT_KEYS entry) in ``folder``."""
    folder.mkdir(exist_ok=True)
    state = {key: {} for key in CHECKPOINT_KEYS}
    state.update(config=RunConfig(**config).to_dict(), epoch=1, run_id=run_id, model={"w": torch.ones(1)},
                 progress=vars(EpochProgress()), best=BestEpochs().state(), rng=rng_state(),
                 data_rng=torch.Generator().get_state(), num_classes=10,
                 normalization={"mean": [0.5] * 3, "std": [0.25] * 3})
    save_checkpoint(folder / "checkpoint.pt", state)
    return folder / "checkpoint.pt"


def test_a_checkpoint_is_refused_where_it_is_not_its_folders_run(tmp_path):
    """Beside a config.json of another run (another run_id, or settings no resume changes), a
    checkpoint was copied in: refused, naming why; a resumable difference is the run's own."""
    folder = tmp_path / "run"
    folder.mkdir()
    write_json(folder / "config.json", {"run_id": "a" * 32, "config": RunConfig(depth=10).to_dict()})
    write_checkpoint(folder, "a" * 32, depth=10, epochs=7, data_dir="elsewhere")
    assert Checkpoint.load(folder).epoch == 1
    write_checkpoint(folder, "b" * 32, depth=10)
    with pytest.raises(RunError, match=f"it is run {'b' * 32}, the folder's config.json is run {'a' * 32}"):
        Checkpoint.load(folder)
    write_checkpoint(folder, "", depth=16)
    with pytest.raises(RunError, match=r"\(depth 16 \(config.json: 10\)\): it was copied in from another run"):
        Checkpoint.load(folder / "checkpoint.pt")


DAMAGED_FIELDS = {
    "epoch -3": (lambda s: s.update(epoch=-3), "its epoch -3 is not a whole number from 0 to the run's 2"),
    "epoch '1'": (lambda s: s.update(epoch="1"), "its epoch '1' is not a whole number"),
    "epoch True": (lambda s: s.update(epoch=True), "its epoch True is not a whole number"),
    "epoch past the run": (lambda s: s.update(epoch=3), "its epoch 3 is not a whole number from 0 to the run's 2"),
    "progress empty": (lambda s: s.update(progress={}), "its progress within the epoch is not the sums"),
    "progress step -1": (lambda s: s["progress"].update(step=-1), "its progress within the epoch is not the sums"),
    "progress nan": (lambda s: s["progress"].update(loss_sum=math.nan), "its progress within the epoch is not the sums"),
    "best empty": (lambda s: s.update(best={}), "its best-epoch record {} is not one train.py writes"),
    "best text": (lambda s: s.update(best={"error": "x", "epoch": 1}), "its best-epoch record"),
    "best later than the epoch": (lambda s: s.update(best={"error": 1.0, "epoch": 5}), "its best-epoch record"),
    "rng not a dict": (lambda s: s.update(rng=1), "its random number generator states are damaged"),
    "torch rng short": (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
                        "its random number generator states are damaged (RuntimeError"),
    "data order rng": (lambda s: s.update(data_rng=torch.zeros(2)), "the data order's generator state is damaged"),
    "normalisation": (lambda s: s.update(normalization={"mean": [1]}), "its normalisation is not three finite"),
    "classes": (lambda s: s.update(num_classes=7), "it has 7 classes where its configuration has 10"),
}


@pytest.mark.parametrize("case", DAMAGED_FIELDS)
def test_every_field_is_checked_before_use(case, tmp_path, finished_run):
    """A checkpoint whose fields are not what train.py writes is refused in one line naming
    the field, before anything uses it (a resume would otherwise delete rows or crash)."""
    change, message = DAMAGED_FIELDS[case]
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    state = torch.load(work / "checkpoint.pt", weights_only=True)
    change(state)
    save_checkpoint(work / "checkpoint.pt", state)
    with pytest.raises(RunError, match="is damaged: " + re.escape(message)):
        Checkpoint.load(work)


def test_a_restored_optimizer_takes_its_settings_from_the_configuration(tmp_path):
    """A checkpoint whose parameter groups say momentum 0.5 and no Nesterov (a damaged or
    edited file): the optimiser keeps the run's own settings and takes only the state."""
    cfg = RunConfig()
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(cfg, model, LearningRate(cfg.lr, torch.device("cpu")))
    state = optimizer.state_dict()
    state["param_groups"][0].update(momentum=0.5, nesterov=False, weight_decay=0.3)
    restore(optimizer, state, tmp_path / "checkpoint.pt")
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 1e-4)


@pytest.mark.parametrize("setting, value, message", [
    ("depth", 11, "records a model that cannot be built (depth 11 is impossible"),
    ("lr", -1.0, "records --lr as -1.0, which is not a valid value"),
    ("seed", 10**40, "records --seed as"),
    ("epochs", -3, "records --epochs as -3, which is not a valid value")])
def test_a_configuration_out_of_its_ranges_is_refused(tmp_path, finished_run, setting, value, message):
    """The flags' own ranges hold for a recorded configuration too: checked as the command
    line checks them, in one line instead of a traceback where the value is used."""
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    state = torch.load(work / "checkpoint.pt", weights_only=True)
    state["config"][setting] = value
    save_checkpoint(work / "checkpoint.pt", state)
    with pytest.raises(UserError, match=re.escape(message)):
        Checkpoint.load(work)
