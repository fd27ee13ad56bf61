"""Run by tests/unit/test_cuda_graph.py in a process of its own, on CUDA: a step that reads the host
(``.item()``) inside it cannot be captured, and the graph runner must fall back to eager steps.
Prints the runner's notices, then "eager" or "graphed"."""
import torch

from densenet_trainer.loop.training import TrainStep
from densenet_trainer.speed import cuda_graph
from helpers import make_step, train_steps

step = make_step(torch.device("cuda"))
call = TrainStep.__call__
TrainStep.__call__ = lambda self: (call(self), self.batch_index.item())
runner = cuda_graph.GraphedStep(step, print)
train_steps(step, runner, 6)
print("eager" if runner.eager else "graphed")
