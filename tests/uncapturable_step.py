"""Run by tests/test_step.py in a process of its own, on CUDA: a step that reads the host
(``.item()``) inside it cannot be captured, and the graph runner must fall back to eager steps.
Prints the runner's notices, then "eager" or "graphed"."""
import torch
from test_step import make_step, train_steps

from densenet_trainer.engine import cuda_graph
from densenet_trainer.engine.step import TrainStep

step = make_step(torch.device("cuda"))
call = TrainStep.__call__
TrainStep.__call__ = lambda self: (call(self), self.batch_index.item())
runner = cuda_graph.GraphedStep(step, print)
train_steps(step, runner, 6)
print("eager" if runner.eager else "graphed")
