"""Everything beneath the scripts (train.py, plot.py, densenet.py, attic/, bench/), in rooms
named by what they hold, each using only the rooms below it here:

- ``run``: a run built from its configuration (build.py, the one place that puts the speed
  machinery on it), its work directory, its checkpoints and the trained model;
- ``speed``: the speed machinery (fused kernels and their backends, their self-test, the
  kernel choice, CUDA graphs, the one-cast low precision), which no other room imports;
  someone working on the trainer may skip it;
- ``loop``: the training loop (loop/training.py, top to bottom), evaluation and progress;
- ``data``: the datasets read and checked, and the batches on the device;
- ``provenance``: what a run ran on and which code trained it, for config.json;
- ``runtime``: the process (device, ranks, signals);
- ``random_state``: the random generators, seeded, saved and put back;
- ``results``: a work directory's format and results across runs beside the paper's
  Table 2 (no torch; plot.py reads it);
- ``whole_files``: writes that are whole and stay in their folder (no torch);
- ``config``: a run's configuration and the command line's rules (no torch);
- ``measuring``: what the bench/ scripts share.
"""

__version__ = "0.2.0"  # the project's version (pyproject.toml reads it); config.json records it
