"""Benchmarks: each prints a table, compares against its baseline in the same run."""
