"""Package data: the built-in model library (library.yaml)."""
