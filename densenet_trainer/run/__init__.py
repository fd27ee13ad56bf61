"""A run: built from its configuration, its kernel choice, its checkpoints, its work directory (plan, files, lock), and the trained model for inference."""
