"""Benchmarks: ``python3 run.py bench`` runs them all and prints one table each."""
