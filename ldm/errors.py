"""The error every layer raises for a bad setting: entry points print it as one `error:` line naming the key."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value or input file, found at start-up; the message names the config key."""
