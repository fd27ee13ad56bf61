"""The fused kernels' self-test (kernel_check.py): the CPU kernels pass it, and a kernel broken
in any of its outputs fails it."""
from __future__ import annotations

import torch


def test_the_cpu_kernels_pass_their_self_test():
    from densenet_trainer.kernels import kernel_check
    assert kernel_check.check(torch.device("cpu")) is None
