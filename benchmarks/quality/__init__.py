"""The quality evaluation (``python -m benchmarks.quality.run_quality``)."""
