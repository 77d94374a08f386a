"""Benchmarks: programs that print one JSON object per result (python -m bench)."""
