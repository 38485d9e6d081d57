"""rillet-dagster: Rillet accounting data into a SQL warehouse with Dagster."""
