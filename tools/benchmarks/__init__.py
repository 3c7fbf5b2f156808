"""Benchmark suites run by ``tools/benchmark.py``."""
