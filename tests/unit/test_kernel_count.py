"""bench/kernels.py: what one training step would launch on a GPU, counted on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench import kernels as kernel_count
from densenet import DenseLayer, DenseNet
from densenet_trainer.config.run_config import RunConfig
from helpers import ROOT, on_forward

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
    stats = count.names["triton.stats_kernel"]
    layers = sum(isinstance(m, DenseLayer) for m in DenseNet(10, 4).modules())
    # a slice per block input and per layer, and each bottleneck's BatchNorm; none for the
    # BatchNorms after each block, which read the statistics the block noted as it was written
    assert stats == 3 + 2 * layers
    assert count.names["triton.finish_grad_kernel"] == stats + 3  # the slices, the 3 BNs' inputs
    # nothing else launches Triton: each pass's last program does its finishing work
    assert count.triton == 2 * norms + 2 * stats + 3
    assert kernel_count.count_step(RunConfig(**TINY_BC, kernels="aten")).triton == 0
    assert not any(name.split(".")[1] in kernel_count.NO_KERNEL or name == "aten.view"
                   for name in count.names)
    assert 0 < count.tiny < count.total and count.bytes > 0
    # an evaluation batch normalises with the running statistics: no batch statistics at all
    assert count.evaluation.names["triton.norm_relu_kernel"] == count.evaluation.triton == norms


def test_the_gemm_path_counts_three_launches_a_bottleneck_where_the_fused_path_counts_five():
    """fused-gemm: each bottleneck's first BatchNorm-ReLU and 1x1 convolution are one GEMM forward
    (which leaves the second BatchNorm's statistics: no statistics pass for it), one backward
    pass, and the weight gradient's sum; the model's counters are made once, before the
    counted step (no zeroing a step)."""
    fused = kernel_count.count_step(RunConfig(**TINY_BC, kernels="fused"))
    gemm = kernel_count.count_step(RunConfig(**TINY_BC, kernels="fused-gemm"))
    layers = sum(isinstance(m, DenseLayer) for m in DenseNet(10, 4).modules())
    for kernel in ("norm_relu_matmul_kernel", "norm_relu_matmul_backward_kernel", "sum_rows_kernel"):
        assert gemm.names[f"triton.{kernel}"] == layers, kernel
    for kernel in ("norm_relu_kernel", "norm_relu_backward_kernel", "stats_kernel"):
        assert gemm.names[f"triton.{kernel}"] == fused.names[f"triton.{kernel}"] - layers, kernel
    assert gemm.names["aten.convolution"] == fused.names["aten.convolution"] - layers
    assert gemm.names["aten.convolution_backward"] == fused.names["aten.convolution_backward"] - layers
    assert gemm.total == fused.total - 2 * layers and gemm.bytes < fused.bytes
    assert not any(name.startswith(("aten.zero", "aten.fill")) for name in set(gemm.names) - set(fused.names))


def test_the_table(capsys):
    assert kernel_count.main(["--depth", "10", "--growth-rate", "4", "--batch", "8",
                              "--paths", "aten,fused", "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("one training step of densenet-bc-10-4, batch 8: kernels a GPU")
    assert out[1].split() == ["path", "ATen", "ops", "Triton", "total", "tiny", "MB", "moved", "(estimate)",
                              "floor", "ms,", "H100", "floor", "ms,", "H200"]
    assert out[2].split()[0] == "aten" and out[3].split()[0] == "fused"
    evaluation = out.index("one evaluation batch of 8:")
    assert [line.split()[0] for line in out[evaluation + 1:evaluation + 4]] == ["path", "aten", "fused"]
    assert any(line.startswith("fused: ") for line in out)
    # the floor: launches at 2 µs one after another, or bytes at the bandwidth, whichever is longer
    fused = out[3].split()
    total, megabytes, floor = int(fused[3].replace(",", "")), float(fused[5].replace(",", "")), float(fused[6])
    assert floor == pytest.approx(max(total * 2e-3, megabytes / 3.35e3), abs=0.006)
    grids = {line.split()[1]: line for line in out if line.startswith("fused ") and "_kernel" in line}
    assert set(grids) == {"stats_kernel", "norm_relu_kernel", "norm_relu_backward_kernel", "finish_grad_kernel"}
    assert "pixel tile(s)" in grids["stats_kernel"] and "1 tile" in grids["norm_relu_kernel"]


@pytest.mark.slow
def test_no_last_program_adds_more_than_256_rows_and_passes_spread_where_they_can():
    """On the paper's model at batch 64 (counted, not run): a pass's last program adds at most
    PARTIAL_ROWS rows of partial sums, however large the map, and every pass with work enough
    for MIN_PROGRAMS tiles of MIN_TILE elements has at least MIN_PROGRAMS programs (the GPU's
    132 twice)."""
    from densenet_trainer.speed import triton_kernels
    assert triton_kernels.partial_grid(64 * 32 * 32, 24)[0][1] == triton_kernels.PARTIAL_ROWS == 256
    count = kernel_count.count_step(RunConfig(batch_size=64))
    for name, grid in count.grids.items():
        enough = grid.elements[0] >= triton_kernels.MIN_PROGRAMS * triton_kernels.MIN_TILE
        assert grid.programs[0] >= triton_kernels.MIN_PROGRAMS or not enough, (name, grid)



def test_channels_come_to_the_kernels_in_their_widest_alignment():
    from densenet_trainer.speed import triton_kernels
    assert [triton_kernels._align(*counts) for counts in ((48, 36), (352, 216), (300,), (48, 13))] == [4, 8, 4, 1]


@pytest.mark.slow
def test_the_ptx_table_shows_wide_loads_in_the_main_passes(tmp_path):
    """bench/kernels.py --ptx compiles each Triton kernel as DenseNet-BC-22-12's step launches
    it, for an H100 (sm_90; no GPU needed, and no TRITON_INTERPRET: in a process of its own).
    Channel counts of 24 + 12i come to the kernels as multiples of 4 or 8 (ALIGN), so the
    heaviest pass, BatchNorm-ReLU's backward, loads mostly 16 or 8 bytes at a time (105 wide
    against 53 single loads in float32); told nothing, as before, Triton loaded every element
    on its own (40 wide against 456)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "bench/kernels.py", "--depth", "22", "--growth-rate", "12",
                             "--batch", "8", "--paths", "fused,fused bf16", "--ptx"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode and "ptxas" in result.stderr:  # the wheel ships it; a stripped Triton may not
        pytest.skip(f"Triton cannot compile for sm_90 here: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split()[:-3]): line.split()[-2:] for line in result.stdout.splitlines()
            if "_kernel" in line and "/" in line}
    for path, single in ((("fused",), 2), (("fused", "bf16"), 3)):  # 4-byte, 2-byte columns
        loads = [int(n) for n in rows[(*path, "norm_relu_backward_kernel")][0].split("/")]
        assert loads[0] + loads[1] > loads[single], (path, loads)
