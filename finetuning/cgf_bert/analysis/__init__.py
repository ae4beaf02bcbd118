"""Looking inside checkpoints: the ranges an encrypted evaluator must cover, layer probes, the kernel view."""
