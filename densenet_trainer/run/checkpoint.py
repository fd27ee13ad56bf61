"""The checkpoint format: what a checkpoint file holds (CHECKPOINT_KEYS; build.Run's
``checkpoint_state`` writes it, ``Checkpoint.load`` reads it back and checks it against its folder), the best-epoch record it
carries, and ``restore``, which puts its states back into a run's model, optimiser and scaler.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from densenet_trainer.config.run_config import RESUMABLE, RunConfig, flag_name
from densenet_trainer.loop.training import EpochProgress
from densenet_trainer.random_state import rng_state_problem
from densenet_trainer.results.layout import CONFIG_FILE, LAST_CHECKPOINT
from densenet_trainer.run.files import RunError, load_checkpoint
from densenet_trainer.whole_files import NotARegularFile, refuse_unless_file

# What every checkpoint holds; one that lacks any of it was not written by this trainer.
CHECKPOINT_KEYS = ("config", "epoch", "progress", "best", "model", "optimizer", "scaler",
                   "data_rng", "rng", "normalization", "num_classes")
INFERENCE_KEYS = ("config", "epoch", "model", "normalization", "num_classes")


@dataclass
class Checkpoint:
    """A checkpoint file's content, with the run's configuration read back from it."""
    path: Path
    state: dict
    config: RunConfig

    @classmethod
    def load(cls, path: Path, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> Checkpoint:
        """Read checkpoint ``path`` (a run's directory: its checkpoint.pt) safely, as
        files.load_checkpoint does, and check that it is the run of its folder
        (``check_folder``); RunError for anything amiss."""
        if path.is_dir():
            path = path / LAST_CHECKPOINT
        state = load_checkpoint(path, keys)
        checkpoint = cls(path, state, RunConfig.from_dict(state["config"], str(path)))
        problem = checkpoint.field_problem(keys)
        if problem:
            raise RunError(f"{path} is damaged: {problem}; use another checkpoint, or start a "
                           f"new run with another --save")
        checkpoint.check_folder()
        return checkpoint

    def field_problem(self, keys: tuple[str, ...]) -> str | None:
        """What in the checkpoint's fields (``keys`` of them) is not what train.py writes:
        every field is checked for its type and range here, before anything uses it."""
        state, cfg = self.state, self.config
        epoch = state["epoch"]
        if type(epoch) is not int or not 0 <= epoch <= cfg.epochs:
            return f"its epoch {epoch!r} is not a whole number from 0 to the run's {cfg.epochs}"
        if state["num_classes"] != cfg.num_classes:
            return f"it has {state['num_classes']!r} classes where its configuration has {cfg.num_classes}"
        normalization = state["normalization"]
        if not (isinstance(normalization, dict) and all(
                isinstance(normalization.get(k), list) and len(normalization[k]) == 3
                and all(_number(v) and math.isfinite(v) for v in normalization[k])
                for k in ("mean", "std")) and all(v > 0 for v in normalization["std"])):
            return "its normalisation is not three finite means and positive deviations"
        data = state.get("data", {})  # from this version on: which images, by split
        if not (isinstance(data, dict) and all(
                isinstance(split, dict) and type(split.get("images")) is int
                and isinstance(split.get("fingerprint"), str) for split in data.values())):
            return "its record of the images it trained on is not one train.py writes"
        if "progress" in keys:
            progress = state["progress"]
            if (not isinstance(progress, dict) or set(progress) != set(EpochProgress.__dataclass_fields__)
                    or type(progress["step"]) is not int or progress["step"] < 0
                    or not all(_number(v) and math.isfinite(v) and v >= 0 for v in progress.values())):
                return "its progress within the epoch is not the sums train.py saves"
        if "best" in keys:
            try:
                best = BestEpochs.from_state(state["best"]) if {"error", "epoch"} <= set(state["best"]) else None
            except TypeError:
                best = None
            if best is None or not (_number(best.error) and type(best.epoch) is int
                                    and 0 <= best.epoch <= epoch):
                return f"its best-epoch record {state['best']!r} is not one train.py writes"
        if "rng" in keys:
            problem = rng_state_problem(state["rng"]) if isinstance(state["rng"], dict) else "not a dict"
            if problem:
                return f"its random number generator states are damaged ({problem})"
            try:
                torch.Generator().set_state(state["data_rng"])
            except (TypeError, RuntimeError, ValueError):
                return "the data order's generator state is damaged"
        return None

    def check_folder(self) -> None:
        """Refuse a checkpoint that is not the run whose config.json lies beside it: another
        run's identity, or settings that no resume could have changed (a checkpoint copied in
        from elsewhere). A checkpoint with no readable config.json beside it is its own record."""
        try:
            refuse_unless_file(self.path.parent / CONFIG_FILE)
            recorded = json.loads((self.path.parent / CONFIG_FILE).read_text())
        except (OSError, UnicodeDecodeError, ValueError, NotARegularFile):
            return
        if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
            return
        ours, theirs = self.state.get("run_id"), recorded.get("run_id")
        differ = [name for name, value in recorded["config"].items()
                  if name not in RESUMABLE and name in self.state["config"]
                  and self.state["config"][name] != value]
        if ours and theirs and ours != theirs and ours not in recorded.get("copied_from", []):
            reason = f"it is run {ours}, the folder's config.json is run {theirs}"
        elif differ:
            reason = ", ".join(f"{flag_name(name)} {self.state['config'][name]} (config.json: "
                               f"{recorded['config'][name]})" for name in differ[:3])
        else:
            return
        raise RunError(f"{self.path} is not the run recorded in {self.path.parent / CONFIG_FILE} "
                       f"({reason}): it was copied in from another run; put this run's own "
                       f"checkpoint back, or use the checkpoint from its own folder")

    @property
    def epoch(self) -> int:
        return self.state["epoch"]


@dataclass
class BestEpochs:
    """The epochs of the lowest test error so far and, with --val-size, of the lowest
    validation error (the epoch best.pt holds). A checkpoint keeps it as a dict."""
    error: float = math.inf
    epoch: int = 0
    val_error: float | None = None
    val_epoch: int | None = None

    @classmethod
    def from_state(cls, state: dict) -> BestEpochs:
        return cls(**state)

    def state(self) -> dict:
        """As a checkpoint keeps it: the validation fields only once there is a best one."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    def update(self, epoch: int, test_error: float, val_error: float | None) -> bool:
        """Take ``epoch``'s errors into the record; whether its validation error is a new
        lowest (best.pt is to be replaced)."""
        if test_error < self.error:
            self.error, self.epoch = test_error, epoch
        lowest = self.val_error if self.val_error is not None else math.inf
        if val_error is None or not val_error < lowest:
            return False
        self.val_error, self.val_epoch = val_error, epoch
        return True


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def restore(target: nn.Module | torch.optim.Optimizer | torch.amp.GradScaler, state: dict,
            path: Path) -> None:
    """load_state_dict, with a mismatch (another architecture, a damaged file) in one line.

    An optimiser keeps every setting of its parameter groups as it was built from the run's
    configuration (momentum, Nesterov, weight decay; the implementation: fused, foreach,
    capturable; the learning rate, the run's LearningRate tensor, which the schedule sets):
    from the checkpoint it takes only its state, the momentum buffers and step counts.
    """
    implementation = [{k: v for k, v in group.items() if k != "params"}
                      for group in getattr(target, "param_groups", [])]
    try:
        target.load_state_dict(state)
        for group, kept in zip(getattr(target, "param_groups", []), implementation):
            group.update(kept)
            _place_step_counts(target, group)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1].strip()
        raise RunError(f"{path} does not fit the model its own config describes ({reason}); "
                       f"use a checkpoint that train.py wrote for this run") from None


def _place_step_counts(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """Put the group's step counts where its implementation reads them: on the parameters'
    device for the fused and capturable ones, on the CPU otherwise. load_state_dict placed
    them for the implementation that saved them (a run trained on the CPU, or without the
    graph, and resumed with it would otherwise fail at its first step)."""
    on_device = group.get("fused") or group.get("capturable")
    for param in group["params"]:
        state = optimizer.state.get(param, {})
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].to(param.device if on_device else "cpu", torch.float32)
