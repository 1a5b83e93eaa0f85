"""Benchmarks (a package: run as ``python -m benchmarks.run_all``)."""
