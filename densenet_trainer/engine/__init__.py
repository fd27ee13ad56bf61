"""The engine: the process, the datasets and the batches on the device, the training step and its CUDA graph, epochs and evaluation."""
