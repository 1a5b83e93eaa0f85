"""CUDA kernels built with g++ over a host shim (see emulated.py)."""
