"""Fault injection on real processes over loopback (issue 3, "Faults").

:mod:`tests.faults.procs` starts and signals real ``fanny-broker serve`` and
``fanny-tui --headless`` processes; :mod:`tests.faults.scenarios` holds the fault scenarios
(each asserts its invariants and returns its figures); the ``test_*.py`` files run them once in
CI and ``tools/reliability_report.py`` runs them many times for docs/reliability.md.
"""
