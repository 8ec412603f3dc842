"""perfmodel: analytic LLM inference cost model, validated against a real reference engine."""

__version__ = "0.1.0"
