"""The speed machinery, which the plain path (model, data, loop, files, results) never imports.

- ``fused.py``: dense blocks without concatenation copies and BatchNorm-ReLU in one pass, over
  two backends, ``cpu_kernels.py`` (C loops in ``cpu_kernels.c``) and ``triton_kernels.py``
  (CUDA); ``batch_counters.py``: the fused BatchNorms' counters moved in one operation;
- ``fused_densenet.py``: densenet.py's model computed with them; ``kernel_check.py``: their
  self-test on a device; ``apply_fused_kernels`` below puts them on a built model;
- ``fused_gemm.py`` (kernels in ``gemm_kernels.py``): --kernels fused-gemm, a bottleneck's
  1x1 convolution as a Triton GEMM that applies the BatchNorm-ReLU as it loads;
- ``kernel_choice.py``: which kernels a run computes with, and --kernels auto's timing;
- ``cuda_graph.py``: the training step and each split's evaluation as checked CUDA graphs.

One call, as Liger Kernel's ``apply_liger_kernel_to_llama()``::

    model = DenseNet(100, 12).to("cuda", memory_format=torch.channels_last)
    apply_fused_kernels(model)   # None, or why the model stays on ATen's operations
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from densenet_trainer.speed import fused, fused_densenet, fused_gemm, kernel_check


def apply_fused_kernels(model: nn.Module, device_type: str | None = None, gemm: bool = False) -> str | None:
    """Make ``model`` (a DenseNet, or any of densenet.py's modules or a model holding them)
    compute its dense blocks and BatchNorm-ReLUs with the fused kernels on
    ``device_type`` (default: where its parameters are), once the kernels have passed their
    self-test there (kernel_check, once per process and device type); with ``gemm``, also its
    bottlenecks' 1x1 convolutions as fused_gemm's GEMMs (``gemm_kernels``, CUDA), where those
    passed theirs. Returns None, or why the model keeps ATen's operations (a failed self-test
    is said as a warning too): the results are the same either way, the speed differs."""
    if not any(isinstance(module, tuple(fused_densenet.FUSED)) for module in model.modules()):
        return "the model holds none of densenet.py's modules"
    device_type = device_type or next(model.parameters()).device.type
    if fused.backend(device_type) is None:  # which has warned
        return "the fused kernels are unavailable here"
    with torch.inference_mode(False), torch.enable_grad():  # the self-test's backward needs them
        failure = kernel_check.failure(device_type)
    if failure:
        fused_densenet.tested_on.discard(device_type)  # models fused before compute with ATen too
        warnings.warn(f"the fused kernels failed their self-test on {device_type} ({failure}); "
                      f"dense blocks use ATen operations instead: the same function, slower",
                      stacklevel=2)
        return f"the fused kernels failed their self-test ({failure})"
    fused_densenet.tested_on.add(device_type)
    if gemm:
        with torch.inference_mode(False), torch.enable_grad():
            problem = kernel_check.gemm_failure(device_type)
        failure = fused_gemm.unavailable(device_type) or (
            problem and f"the GEMM kernels failed their self-test on {device_type} ({problem})")
        if failure:
            warnings.warn(f"{failure}; the 1x1 convolutions compute as with the fused kernels alone",
                          stacklevel=2)
        gemm = failure is None
    fused_densenet.fuse(model, gemm)
    return None
