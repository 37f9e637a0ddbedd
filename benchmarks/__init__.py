"""Benchmark harnesses that run tokenmill beside its peers (scripts, not part of the installed package)."""
