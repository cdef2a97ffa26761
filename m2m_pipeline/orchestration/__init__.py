"""Dagster orchestration of the M2M chain (thin adapters over the library; see docs/orchestration.md)."""
