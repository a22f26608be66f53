"""Config: the typed schema, the YAML setups in this folder, and command-line parsing."""
from conf.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EnvironmentSetupError,
    JudgeError,
    PolarisError,
    RoleLostError,
)
from conf.loader import available_confs, load_config, resolve_path, to_yaml
from conf.schema import Config

__all__ = [
    "CheckpointError", "Config", "ConfigError", "DataError", "EnvironmentSetupError", "JudgeError", "PolarisError", "RoleLostError",
    "available_confs", "load_config", "resolve_path", "to_yaml",
]
