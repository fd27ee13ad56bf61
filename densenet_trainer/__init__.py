"""Everything beneath the scripts (train.py, plot.py, densenet.py, attic/, bench/), by layer.

- ``settings``: a run's configuration and the command line's rules (no torch);
- ``records``: a work directory's format and results across runs beside the paper's Table 2
  (no torch; plot.py reads it);
- ``engine``: the process (device, ranks, signals), the data on the device, the training
  loop (engine/loop.py, top to bottom), evaluation and progress;
- ``run``: a run built from its configuration (build.py, the one place that puts the speed
  machinery on it), its work directory and checkpoint files;
- ``speed``: the speed machinery (fused kernels and their backends, their self-test, the
  kernel choice, CUDA graphs, the one-cast low precision), which no other layer imports;
  someone working on the trainer may skip it;
- ``measuring``: what the bench/ scripts share.
"""

__version__ = "0.2.0"  # the project's version (pyproject.toml reads it); config.json records it
