"""The checkpoint format (checkpoint.py): what restore puts back and what it keeps (the optimiser's implementation, its step counts where it reads them, the run's learning rate), the best-epoch record, a checkpoint refused where it is not its folder's run."""
from __future__ import annotations

import pytest
import torch

from densenet_trainer.engine.step import LearningRate
from densenet_trainer.run import build
from densenet_trainer.run.checkpoint import restore
from densenet_trainer.settings.config import RunConfig
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
