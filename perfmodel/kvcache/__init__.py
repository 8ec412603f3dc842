"""KV-cache compression: pruning (per-token / per-channel, magnitude / output-aware) stored in a bitmap tile
format, and the comparison methods KIVI (quantisation), H2O (heavy hitters) and StreamingLLM (sinks + window)."""
