"""Benchmarks of stkd-dist; ``python -m bench`` runs every ``bench/<name>.py`` with a ``main()``.

Each benchmark writes its own section of ``bench/RESULTS.md``.
"""
