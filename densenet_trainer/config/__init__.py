"""A run's configuration, the architecture's arithmetic and the command line's rules: torch-free, so plot.py and the tools read them."""
