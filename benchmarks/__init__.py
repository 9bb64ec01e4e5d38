"""FANNY benchmarks: each figure of issue 7's table beside its floor or peer, measured in one run.

Run them with ``benchmarks/run [NAME...] [--quick] [--json PATH]`` (see the README and
docs/performance.md). Load goes to loopback (127.0.0.1) only; every loop is bounded in count
and in time. Benchmarks report; they never assert a timing.
"""
