"""Benchmarks: matmul peak, training throughput and MFU, and the standard-recipe baseline."""
