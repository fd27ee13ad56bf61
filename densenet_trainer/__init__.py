"""Everything beneath the scripts (train.py, plot.py, densenet.py, attic/, bench/), by layer.

- ``settings``: a run's configuration and the command line's rules (no torch);
- ``records``: results across runs beside the paper's Table 2 (no torch; plot.py reads it);
- ``kernels``: the fused dense-block layer, its CPU (C) and CUDA (Triton) backends and their
  self-test; someone working on the trainer may skip it;
- ``engine``: the process (device, ranks, signals), the data on the device, the training
  step and its CUDA graph, the epoch loop and evaluation;
- ``run``: a run built from its configuration, its work directory and checkpoint files;
- ``measuring``: what the bench/ scripts share.
"""

__version__ = "0.2.0"  # the project's version (pyproject.toml reads it); config.json records it
