"""A run: built from its configuration, its work directory (plan, files, lock) and its checkpoints."""
