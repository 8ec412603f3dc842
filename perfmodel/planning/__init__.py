"""Capacity planning on top of the cost model: deployments, the SLO planner, the serving simulator."""
