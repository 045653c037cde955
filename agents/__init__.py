"""Faust agents: thin adapters that decode records and feed loopline's pure core."""
