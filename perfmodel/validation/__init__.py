"""Holding the cost model against the reference engine: exact counts, measured-vs-predicted time."""
