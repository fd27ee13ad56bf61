"""Several runs in one process, a step of each in turn (train.py --seeds).

Each run is a generator of its steps (train.py's ``train_epochs``), which yields after every
training step. ``take_turns`` advances them one step each, round and round: on the CPU, where
a step is synchronous, that is the runs one after another, step by step; on a GPU each run
issues its step on a CUDA stream of its own and the next run's step is queued while the
first one's kernels run, so that the GPU runs them together.

A run's numbers stay its own: before its turn the process's random generators are given its
state and after it that state is kept (dropout draws from them; a checkpoint saves them), and
its data order and augmentation have their own generator (data.TrainBatches).
"""
from __future__ import annotations

import contextlib
from collections.abc import Generator
from dataclasses import dataclass

import torch

from densenet_trainer.random_state import rng_state, set_rng_state


def finish(steps: Generator[None, None, object]):
    """Run a generator of steps to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


@dataclass
class Turn:
    """One run among several: its steps, its random generators' state, its stream on a GPU,
    and, once it has ended, how (``outcome``: its return value, or the exception that ended it)."""
    steps: Generator[None, None, int]
    device: torch.device
    rng: dict  # rng_state() as the run was built: its seed's
    stream: torch.cuda.Stream | None = None
    outcome: int | BaseException | None = None

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the run's set-up

    def take(self, ends: tuple[type[BaseException], ...]) -> bool:
        """Advance the run by one step; False once it has ended (normally, or with one of ``ends``)."""
        set_rng_state(self.rng)
        try:
            with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                next(self.steps)
            return True
        except StopIteration as end:
            self.outcome = end.value
        except ends as error:
            self.outcome = error
        finally:
            self.rng = rng_state()
        if self.stream is not None:  # the process's stream goes on after the run's last work
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return False


def take_turns(turns: list[Turn], ends: tuple[type[BaseException], ...]) -> None:
    """A step of each run in turn until every run has ended. A run that raises one of ``ends``
    (it diverged, say, or a signal stopped it and it saved) ends alone, its exception kept in
    its ``outcome``, and the others go on; any other exception stops them all."""
    going = list(turns)
    while going:
        going = [turn for turn in going if turn.take(ends)]

