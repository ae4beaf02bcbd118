"""What a run leaves behind: atomic writes, checkpoints, run records, provenance, names."""
