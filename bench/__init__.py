"""Benchmarks: scripts that measure the data path and write bench/results/."""
