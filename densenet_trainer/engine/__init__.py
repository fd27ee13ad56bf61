"""The engine: the process, the data on the device, the training step and its CUDA graph, epochs and evaluation."""
