"""The fused kernels' self-test (kernel_check.py): the CPU kernels pass it, and a kernel set
that raises or is wrong in one output fails it, naming why."""
from __future__ import annotations

import pytest
import torch

from densenet_trainer.kernels import kernel_check


def test_the_cpu_kernels_pass_their_self_test():
    assert kernel_check.check(torch.device("cpu")) is None


@pytest.mark.parametrize("fault, reason", [
    ("error", "the kernels in torch.float32: RuntimeError: Triton launcher: Python.h: No such file"),
    ("tail", "the kernels in torch.float32: stats' variance: Tensor-likes are not close!")])
def test_a_kernel_that_raises_or_is_wrong_fails_naming_why(broken, fault, reason):
    """A launcher's error, or one channel tail's variance 1% off: the self-test says which,
    and ``failure``, what a run asks before using the kernels, says the same."""
    broken(fault)
    assert kernel_check.check(torch.device("cpu")).startswith(reason)
    assert kernel_check.failure("cpu").startswith(reason)
