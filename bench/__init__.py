"""Benchmarks (CPU side by side, GPU script) and the load generator they share."""
