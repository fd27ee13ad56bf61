"""A work directory's format (layout.py) and results across runs, grouped over seeds, beside the paper's Table 2 (groups.py): torch-free, for plot.py."""
