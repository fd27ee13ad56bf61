"""How an epoch's progress is shown: a bar on a terminal, plain lines in a log, each saying
when the epoch and the run will end (loop.train_epoch updates it at its checks)."""
from __future__ import annotations

import math
import time

from densenet_trainer.results.layout import duration


def time_left(epoch: int, epochs: int, steps: int, start_step: int, done: int,
              elapsed: float) -> tuple[float, float | None]:
    """Seconds until the epoch ends and until the run's training does (None in its last
    epoch), at the pace of this epoch's steps so far."""
    per_step = elapsed / max(done - start_step, 1)
    epoch_left = (steps - done) * per_step
    return epoch_left, (epoch_left + (epochs - epoch) * steps * per_step if epoch < epochs else None)


class ProgressBar:
    """On a terminal: tqdm's bar for the epoch, updated at every check, with when the whole
    run ends beside tqdm's own time left in the epoch."""

    def __init__(self, epoch: int, epochs: int, steps: int, start_step: int, label: str = "") -> None:
        from tqdm import tqdm
        self.epoch, self.epochs, self.steps, self.start_step = epoch, epochs, steps, start_step
        self.bar = tqdm(total=steps, initial=start_step, leave=False, unit="step",
                        desc=f"{f'[{label}] ' if label else ''}epoch {epoch}/{epochs}", dynamic_ncols=True)

    def due(self, done: int) -> bool:
        return True

    def show(self, done: int, loss: float, error: float, images_per_s: float, elapsed: float) -> None:
        self.bar.update(done - self.bar.n)
        _, run_left = time_left(self.epoch, self.epochs, self.steps, self.start_step, done, elapsed)
        self.bar.set_postfix(loss=f"{loss:.3f}", err=f"{error:.1f}%", img_s=f"{images_per_s:.0f}",
                             **({"run_ends_in": duration(run_left)} if run_left is not None else {}))

    def close(self) -> None:
        self.bar.close()


class ProgressLines:
    """Without a terminal (nohup, a batch scheduler's log): a plain line every ``every``
    seconds and at 25, 50 and 75% of the epoch, indented so that it never reads as an
    epoch's result; with several runs in the process, after the run's ``label``."""

    EVERY = 30  # seconds

    def __init__(self, epoch: int, epochs: int, steps: int, start_step: int, label: str = "",
                 every: float = EVERY) -> None:
        self.epoch, self.epochs, self.steps, self.start_step = epoch, epochs, steps, start_step
        self.every, self.label = every, label
        self.marks = [math.ceil(steps * q / 4) for q in (1, 2, 3)]
        self.marks = [m for m in self.marks if start_step < m < steps]
        self.last = time.perf_counter()

    def due(self, done: int) -> bool:
        if done == self.steps:  # the epoch's own line follows
            return False
        quarter = bool(self.marks) and done >= self.marks[0]
        return quarter or time.perf_counter() - self.last >= self.every

    def show(self, done: int, loss: float, error: float, images_per_s: float, elapsed: float) -> None:
        while self.marks and done >= self.marks[0]:
            self.marks.pop(0)
        self.last = time.perf_counter()
        eta, run = time_left(self.epoch, self.epochs, self.steps, self.start_step, done, elapsed)
        print(f"  {f'[{self.label}] ' if self.label else ''}epoch {self.epoch}: step {done}/{self.steps} ({100 * done // self.steps}%)  "
              f"loss {loss:.4f}  error {error:.2f}%  {images_per_s:,.0f} img/s  "
              f"epoch ends in {duration(eta)}"
              + (f", the run in about {duration(run)}" if run is not None else ""), flush=True)

    def close(self) -> None:
        pass
