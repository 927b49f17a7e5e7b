"""The YAML config file, validated into frozen settings: `config.load(path)` returns `Settings`
or raises `ConfigError` naming every problem by file, line and key."""

from jobqd.config.settings import ConfigError, Settings, load

DEFAULT_CONFIG = "/etc/jobqd.yaml"
CONFIG_ENV = "JOBQD_CONFIG"
"""The config file when -c names none: $JOBQD_CONFIG, else /etc/jobqd.yaml (jobqd and jobqctl)."""

__all__ = ["CONFIG_ENV", "DEFAULT_CONFIG", "ConfigError", "Settings", "load"]
