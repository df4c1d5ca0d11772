"""One typed, frozen configuration tree, loaded once and passed down (tree.py), and the
code that reads it from defaults, a TOML file, the environment and flags (loader.py)."""
from loraxd.config.loader import build_parser, load, load_or_exit
from loraxd.config.tree import (ADAPTER_SOURCES, DEFAULT_CONFIG_PATH, DEVICES, DTYPES,
                                ENV_PREFIX, EXIT_CONFIG, Actions, AdapterConfig, Config,
                                ConfigError, ModelConfig, PathsConfig, SchedulerConfig,
                                ServerConfig, WorkerConfig, default_paths)

__all__ = ["ADAPTER_SOURCES", "DEFAULT_CONFIG_PATH", "DEVICES", "DTYPES", "ENV_PREFIX",
           "EXIT_CONFIG", "Actions", "AdapterConfig", "Config", "ConfigError", "ModelConfig",
           "PathsConfig", "SchedulerConfig", "ServerConfig", "WorkerConfig", "build_parser",
           "default_paths", "load", "load_or_exit"]
