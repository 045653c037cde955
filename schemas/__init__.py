"""Avro schemas of loopline's records (namespace ``loopline``), shipped as package data."""
