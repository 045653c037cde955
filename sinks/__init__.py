"""Sinks: where loopline's streams leave the pipeline (the DuckDB archive lands here)."""
