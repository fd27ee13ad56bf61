"""The data: the datasets read from their files and checked (datasets.py), and the batches on the device (loader.py)."""
