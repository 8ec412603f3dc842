"""Model and hardware specifications (dataclasses loaded from YAML, config.json or the built-in library)."""

from perfmodel.specs.hardware import HardwareSpec, load_hardware, list_hardware
from perfmodel.specs.model import ModelSpec, load_model, list_models

__all__ = ["HardwareSpec", "ModelSpec", "load_hardware", "load_model", "list_hardware", "list_models"]
