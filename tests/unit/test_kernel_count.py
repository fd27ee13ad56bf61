"""bench/kernels.py: what one training step would launch on a GPU, counted on the CPU."""
from __future__ import annotations

import torch

from bench import kernels as kernel_count
from densenet import DenseNet
from densenet_trainer.settings.config import RunConfig
from helpers import on_forward

TINY_BC = dict(depth=10, growth_rate=4, batch_size=8)


def test_a_planted_operation_is_counted_once():
    """One more addition in forward (its backward passes the gradient on as it is) is one
    more kernel; the rest of the count does not move."""
    cfg = RunConfig(**TINY_BC, kernels="aten")
    before = kernel_count.count_step(cfg)
    with on_forward(lambda count, model, output: output.add(0.5), training=True):
        after = kernel_count.count_step(cfg)
    assert after.total == before.total + 1 and after.aten == before.aten + 1
    assert after.names - before.names == {"aten.add": 1}
    assert kernel_count.count_step(cfg).names == before.names  # the same every time


def test_the_fused_path_counts_its_triton_launches():
    """Each BatchNorm-ReLU is one normalising launch forward and one backward; views and
    allocations are not kernels."""
    count = kernel_count.count_step(RunConfig(**TINY_BC, kernels="fused"))
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in DenseNet(10, 4).modules())
    assert count.names["triton.norm_relu_kernel"] == norms
    assert count.names["triton.norm_relu_backward_kernel"] == norms
    stats = count.names["triton.stats_kernel"]  # one per slice of a block's buffer
    assert count.names["triton.backward_finish_kernel"] == norms
    assert count.names["triton.stats_finish_kernel"] == count.names["triton.finish_grad_kernel"] == stats
    assert count.triton == 3 * norms + 3 * stats  # nothing else launches Triton
    assert kernel_count.count_step(RunConfig(**TINY_BC, kernels="aten")).triton == 0
    assert not any(name.split(".")[1] in kernel_count.NO_KERNEL or name == "aten.view"
                   for name in count.names)
    assert 0 < count.tiny < count.total and count.bytes > 0


def test_the_table(capsys):
    assert kernel_count.main(["--depth", "10", "--growth-rate", "4", "--batch", "8",
                              "--paths", "aten,fused", "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("one training step of densenet-bc-10-4, batch 8: kernels a GPU")
    assert out[1].split() == ["path", "ATen", "ops", "Triton", "total", "tiny", "MB", "moved", "(estimate)"]
    assert out[2].split()[0] == "aten" and out[3].split()[0] == "fused"
    assert any(line.startswith("fused: ") for line in out)
