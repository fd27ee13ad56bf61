"""The fused dense-block layer and BatchNorm-ReLU, its CPU (C) and CUDA (Triton) backends, and their self-test."""
