"""Config: the typed schema, the YAML setups in this folder, and command-line parsing."""
from conf.errors import CheckpointError, ConfigError, DataError, EnvironmentSetupError, JudgeError, PolarisError
from conf.loader import available_confs, load_config, to_yaml
from conf.schema import Config

__all__ = [
    "CheckpointError", "Config", "ConfigError", "DataError", "EnvironmentSetupError", "JudgeError", "PolarisError",
    "available_confs", "load_config", "to_yaml",
]
