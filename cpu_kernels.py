"""fused.py's three kernels for the CPU: the C loops of cpu_kernels.c, compiled at first use.

The same functions, with the same arguments and results, as triton_kernels.py has for CUDA
(fused.py calls whichever fits the tensors' device). Feature maps are channels-last, seen as
P pixels of C channels, with a pixel stride for a block buffer's channel prefix:

- ``norm_relu``: y = relu(x * scale + shift), one pass;
- ``norm_relu_backward``: with gm = g where y > 0, out += gm * a, and per channel the sums of
  gm and of gm * (x - mean) (the statistics' part of the gradient);
- ``stats``: per channel mean and biased variance, and optionally a copy into the buffer.

The source is compiled with the system's C compiler (``cc``, ``gcc`` or ``$CC``, with
OpenMP; about 0.3 s) into a private temporary directory, for this machine (-march=native)
and this process. The kernels share torch's OpenMP thread pool. Per-channel sums are taken in
double, per thread in a fixed order: the same inputs give the same bits.
"""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_suffix(".c")
DTYPES = (torch.float32, torch.float64)  # what the kernels compute in
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGUMENTS = {"norm_relu": [_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR],
              "norm_relu_backward": [_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64,
                                     _PTR, _PTR],
              "stats": [_PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR]}


class Unavailable(RuntimeError):
    """The kernels cannot be built here; the message says why."""


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernels, built once per process; Unavailable where that is not possible."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if sys.platform != "linux" or compiler is None:
        raise Unavailable("no C compiler (cc, gcc or $CC) was found")
    folder = tempfile.mkdtemp(prefix="densenet-kernels-")
    built = os.path.join(folder, "kernels.so")
    try:
        # -march=native: built on the machine that runs it, for this process only
        subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-pipe",
                        str(SOURCE), "-o", built], check=True, capture_output=True, text=True,
                       timeout=120)
        # torch has loaded its OpenMP runtime already; the kernels share its thread pool
        lib = ctypes.CDLL(built)
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or "").strip().splitlines() or [f"exit status {error.returncode}"]
        raise Unavailable(f"{compiler} failed: {detail[0]}") from None
    except (OSError, subprocess.SubprocessError) as error:
        raise Unavailable(f"{compiler} could not build them: {error}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for name, types in _ARGUMENTS.items():
        for suffix in _SUFFIX.values():
            getattr(lib, f"{name}_{suffix}").argtypes = types + [ctypes.c_int]  # + threads
    return lib


def _call(name: str, dtype: torch.dtype, *args) -> None:
    # tensors as pointers; None is NULL
    converted = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, Tensor) else a for a in args]
    getattr(library(), f"{name}_{_SUFFIX[dtype]}")(*converted, torch.get_num_threads())


def norm_relu(x: Tensor, ldx: int, P: int, C: int, scale: Tensor, shift: Tensor, y: Tensor) -> None:
    _call("norm_relu", x.dtype, x, ldx, P, C, scale, shift, y)


def norm_relu_backward(g: Tensor, y: Tensor, x: Tensor, ldx: int, P: int, C: int, mean: Tensor,
                       a: Tensor, out: Tensor, ldo: int) -> Tensor:
    """Adds the gradient into ``out``; returns the per-channel sums of gm and gm * (x - mean),
    a (2, C) float64 tensor."""
    sums = torch.empty(2, C, dtype=torch.float64)
    _call("norm_relu_backward", x.dtype, g, y, x, ldx, P, C, mean, a, out, ldo, sums[0], sums[1])
    return sums


def stats(f: Tensor, P: int, C: int, dst: Tensor | None, ldd: int) -> Tensor:
    """Mean and biased variance per channel of the dense P x C ``f`` (a (2, C) float64 tensor),
    copying ``f`` into ``dst`` (pixel stride ``ldd``) unless it is None."""
    result = torch.empty(2, C, dtype=torch.float64)
    _call("stats", f.dtype, f, P, C, dst, ldd, result[0], result[1])
    return result
