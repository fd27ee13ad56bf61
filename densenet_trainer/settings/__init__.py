"""A run's configuration and the command line's rules: torch-free, so plot.py and the tools read them."""
