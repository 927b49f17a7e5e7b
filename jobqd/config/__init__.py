"""The YAML config file, validated into frozen settings: `config.load(path)` returns `Settings`
or raises `ConfigError` naming every problem by file, line and key."""

from jobqd.config.settings import ConfigError, Settings, load

__all__ = ["ConfigError", "Settings", "load"]
