"""Results across runs, grouped over seeds, beside the paper's Table 2: torch-free, for plot.py."""
