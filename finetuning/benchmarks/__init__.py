"""Benchmarks that compare side by side, in one process and one run (``python -m benchmarks``)."""
