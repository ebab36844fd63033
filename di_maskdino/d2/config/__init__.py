"""Configuration: the keys (`defaults.py`), the core's descriptions read from them
(`specs.py`), their checks (`validation.py`) and loading (`load.py`)."""

from .defaults import add_di_maskdino_config
from .load import load_config, use_available_device
from .specs import ARCHITECTURE_KEYS, OBJECTIVE_KEYS, architecture_from_config, objective_from_config
from .validation import ConfigError, validate_config

__all__ = [
    "add_di_maskdino_config",
    "load_config",
    "use_available_device",
    "architecture_from_config",
    "objective_from_config",
    "ARCHITECTURE_KEYS",
    "OBJECTIVE_KEYS",
    "ConfigError",
    "validate_config",
]
