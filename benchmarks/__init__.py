"""Benchmarks and long-running checks (run as scripts; see the README)."""
