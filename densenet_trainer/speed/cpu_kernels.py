"""fused.py's kernels for the CPU: the C loops of cpu_kernels.c, compiled at first use.

The same functions, with the same arguments and results, as triton_kernels.py has for CUDA
(fused.py calls whichever fits the tensors' device; that file says what each computes).
Here the per-channel work around the passes over the pixels (scale and shift, running
statistics, the gradient's coefficients) is done with torch operations, which cost nothing
on a CPU; the C loops make the passes:

- ``norm_relu``: y = relu(x * scale + shift), one pass, zeros in y's padding channels;
- ``norm_relu_backward``: with gm = g where y > 0, out += gm * a, and per channel the sums of
  gm and of gm * (x - mean) (the statistics' part of the gradient);
- ``stats``: per channel mean and biased variance, and optionally a copy into the buffer.

The source is compiled with the system's C compiler (``cc``, ``gcc`` or ``$CC``, with
OpenMP; about 0.4 s) for this machine (-march=native), once per source, compiler and
processor, into a cache folder (``cache_folder``) that every later process loads from; a
build writes into a scratch folder there and renames the library into place under a name
holding its checksum, so that two processes building at once each load a whole one and a
damaged library is rebuilt, never loaded. The kernels share torch's OpenMP thread pool. Per-channel sums are taken in
double, per thread in a fixed order: the same inputs give the same bits.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCE = Path(__file__).with_suffix(".c")
DTYPES = (torch.float32, torch.float64)  # what the kernels compute in
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGUMENTS = {"norm_relu": [_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64],
              "norm_relu_backward": [_PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64,
                                     _PTR, _PTR],
              "stats": [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR]}
PIXEL_STRIDE_MULTIPLE = 1  # a block buffer's pixels need no padding here
CONV_CHANNEL_MULTIPLE: dict[torch.dtype, int] = {}  # nor the convolutions' channels (conv_padding.conv_channels)


CACHE_VARIABLE = "DENSENET_KERNEL_CACHE"  # where the built kernels are kept (see cache_folder)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-pipe"]


class Unavailable(RuntimeError):
    """The kernels cannot be built here; the message says why."""


def cache_folder() -> Path:
    """Where built kernels are kept: $DENSENET_KERNEL_CACHE, else densenet-trainer/ in
    $XDG_CACHE_HOME or ~/.cache (as torch and Triton keep theirs)."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "densenet-trainer"


def build_key(compiler: str) -> str:
    """What decides the built library: the source, the compiler (its path and version), the
    flags and, for -march=native, the processor (model and features)."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise Unavailable(f"{compiler} could not be run: {error}") from None
    try:
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith(("model name", "flags"))][:2]
    except OSError:
        cpu = [platform.processor()]
    identity = [SOURCE.read_text(), shutil.which(compiler) or compiler, version, *FLAGS,
                platform.machine(), *cpu]
    return hashlib.sha256("\n".join(identity).encode()).hexdigest()[:20]


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernels, loaded once per process: built once per source, compiler and
    processor into cache_folder() (a private temporary folder where that cannot be written);
    Unavailable where they cannot be built."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if sys.platform != "linux" or compiler is None:
        raise Unavailable("no C compiler (cc, gcc or $CC) was found")
    key = build_key(compiler)
    folder = cache_folder() / "cpu-kernels"
    cached = _verified(folder, key)
    if cached is not None:
        return _bind(ctypes.CDLL(str(cached)), compiler)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_builds(folder)
        scratch = tempfile.mkdtemp(prefix=f"{BUILDING}{os.getpid()}@{socket.gethostname()}@", dir=folder)
    except OSError:  # a cache that cannot be written: this process's own copy
        folder, scratch = None, tempfile.mkdtemp(prefix="densenet-kernels-")
    try:
        target = os.path.join(scratch, "kernels.so")
        _compile(compiler, target)
        if folder is not None:  # named with its checksum, renamed whole into place
            built = folder / f"kernels-{key}-{_digest(Path(target))}.so"
            os.replace(target, built)
            target = str(built)
        # torch has loaded its OpenMP runtime already; the kernels share its thread pool
        return _bind(ctypes.CDLL(target), compiler)
    except OSError as error:
        raise Unavailable(f"the kernels {compiler} built cannot be loaded: {error}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _verified(folder: Path, key: str) -> Path | None:
    """The cached library of ``key`` whose bytes match the checksum in its name; one that does
    not (truncated, overwritten) is removed, never loaded: loading a damaged library can kill
    the process."""
    for candidate in sorted(folder.glob(f"kernels-{key}-*.so")):
        try:
            if candidate.is_file() and _digest(candidate) == candidate.stem.rsplit("-", 1)[1]:
                return candidate
            candidate.unlink()
        except OSError:
            continue
    return None


BUILDING = ".building-"  # a build's scratch folder in the cache: .building-PID@HOST@...


def _remove_abandoned_builds(folder: Path) -> None:
    """Scratch folders left by builds on this host whose process is gone (killed while
    compiling); another host's (a shared home) are its own to clear."""
    for scratch in folder.glob(f"{BUILDING}*@*@*"):
        pid, host, _ = scratch.name.removeprefix(BUILDING).split("@", 2)
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _compile(compiler: str, target: str) -> None:
    try:
        # -march=native: built on the machine that runs it (the processor is in the cache key)
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", target], check=True,
                       capture_output=True, text=True, timeout=120)
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or "").strip().splitlines() or [f"exit status {error.returncode}"]
        raise Unavailable(f"{compiler} failed: {detail[0]}") from None
    except (OSError, subprocess.SubprocessError) as error:
        raise Unavailable(f"{compiler} could not build them: {error}") from None


def _bind(lib: ctypes.CDLL, compiler: str) -> ctypes.CDLL:
    """``lib`` with each kernel's argument types declared."""
    for name, types in _ARGUMENTS.items():
        for suffix in _SUFFIX.values():
            try:
                getattr(lib, f"{name}_{suffix}").argtypes = types + [ctypes.c_int]  # + threads
            except AttributeError:  # a $CC that built something else
                raise Unavailable(f"{compiler} built a library without the kernel "
                                  f"{name}_{suffix}") from None
    return lib


def _call(name: str, dtype: torch.dtype, *args) -> None:
    # tensors as pointers; None is NULL
    converted = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, Tensor) else a for a in args]
    getattr(library(), f"{name}_{_SUFFIX[dtype]}")(*converted, torch.get_num_threads())


def stats(f: Tensor, f_stride: int, P: int, C: int, dst: Tensor | None, dst_stride: int, mean: Tensor,
          var: Tensor, counters: Tensor | None = None) -> None:
    """Mean and biased variance per channel of ``f`` (P x C, pixel stride ``f_stride``) into
    ``mean`` and ``var``, copying ``f`` into ``dst`` (pixel stride ``dst_stride``) unless it is None
    (``counters``: the Triton kernels', unused here)."""
    result = torch.empty(2, C, dtype=torch.float64)
    _call("stats", f.dtype, f, f_stride, P, C, dst, dst_stride, result[0], result[1])
    mean.copy_(result[0])
    var.copy_(result[1])


def norm_relu(x: Tensor, x_stride: int, P: int, C: int, mean: Tensor, var: Tensor, weight: Tensor,
              bias: Tensor, eps: float, y: Tensor, y_stride: int, running_mean: Tensor | None = None,
              running_var: Tensor | None = None, momentum: float = 0.0) -> None:
    """y = relu(batch_norm(x)) with the given statistics, on y's pixel stride ``y_stride``
    (>= C; the channels beyond C are written as zeros); the running statistics move by
    ``momentum`` towards the batch's (the variance unbiased) where given."""
    if running_mean is not None:
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(var * (P / max(P - 1, 1)), momentum)
    scale = weight * torch.rsqrt(var + eps)
    _call("norm_relu", x.dtype, x, x_stride, P, C, scale, bias - mean * scale, y, y_stride)


def norm_relu_backward(g: Tensor, y: Tensor, y_stride: int, x: Tensor, x_stride: int, P: int, C: int,
                       mean: Tensor, var: Tensor, weight: Tensor, eps: float, out: Tensor, out_stride: int,
                       accumulate: bool, coefficients: Tensor | None,
                       counters: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Adds (or with ``accumulate`` False writes) the gradient into ``out`` and the batch
    statistics' part into ``coefficients`` (rows b and d) unless None; returns the
    gradients of weight and bias. ``g`` and ``y`` are on the pixel stride ``y_stride``
    (``counters``: the Triton kernels', unused here)."""
    if not accumulate:
        out[:, :C].zero_()
    invstd = torch.rsqrt(var + eps)
    a = weight * invstd
    sums = torch.empty(2, C, dtype=torch.float64)
    _call("norm_relu_backward", x.dtype, g, y, y_stride, x, x_stride, P, C, mean, a, out, out_stride,
          sums[0], sums[1])
    sum_g, sum_gx = sums.to(weight.dtype)
    if coefficients is not None:
        b = -a * invstd * invstd * sum_gx / P
        d = -a * sum_g / P - b * mean
        if accumulate:
            coefficients[0, :C] += b
            coefficients[1, :C] += d
        else:
            coefficients[0, :C], coefficients[1, :C] = b, d
    return sum_gx * invstd, sum_g


def finish_grad(grad: Tensor, grad_stride: int, x: Tensor, x_stride: int, coefficients: Tensor,
                dtype: torch.dtype, width: int) -> Tensor:
    """grad + x * b + d per channel (``coefficients`` rows b and d), in ``dtype``, with zero
    channels up to ``width``; grad and x are (N, C, H, W) channel slices of channels-last
    buffers, pixel strides ``grad_stride`` and ``x_stride``. Computed in place in ``grad``."""
    grad.addcmul_(x, coefficients[0].view(1, -1, 1, 1))
    grad.add_(coefficients[1].view(1, -1, 1, 1))
    return zero_padded(grad.to(dtype), width)


def zero_padded(x: Tensor, width: int) -> Tensor:
    """``x`` (N, C, H, W) with zero channels up to ``width``."""
    return F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1])) if width > x.shape[1] else x
