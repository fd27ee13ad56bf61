"""The loop: the training step and the epoch over it (training.py, top to bottom), evaluation and progress."""
