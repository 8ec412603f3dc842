"""The reference inference engine: one transformer definition, run on NumPy or PyTorch, instrumented so every
operator's FLOPs, bytes and time line up by name with the cost model's."""

from perfmodel.engine.transformer import KVCache, Transformer

__all__ = ["KVCache", "Transformer"]
