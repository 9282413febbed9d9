"""Configuration: TOML files read once, strictly, into frozen typed dataclasses."""
from __future__ import annotations

from .babysitter import BabysitterConfig, BackendConfig, SupervisionConfig
from .node import NodeConfig, apply_overrides, load_config_files
from .registry import RegistryConfig
from .router import RouterConfig
from .schema import ConfigError, Problem

__all__ = [
    "BabysitterConfig", "BackendConfig", "SupervisionConfig", "NodeConfig", "RegistryConfig",
    "RouterConfig", "ConfigError", "Problem", "apply_overrides", "load_config_files",
]
