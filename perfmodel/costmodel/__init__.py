"""Analytic cost model: per-operator FLOPs and bytes (operators), the roofline (roofline), phases and requests."""

from perfmodel.costmodel.operators import Op, Precision, phase_ops
from perfmodel.costmodel.roofline import OpTiming, op_timings, phase_summary

__all__ = ["Op", "Precision", "phase_ops", "OpTiming", "op_timings", "phase_summary"]
