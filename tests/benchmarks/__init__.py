"""Tests of the benchmarks' harness (never of the timings it reports)."""
