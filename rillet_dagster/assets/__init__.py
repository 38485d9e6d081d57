"""Dagster assets: Rillet entities (and, later, reports, models and checks)."""
