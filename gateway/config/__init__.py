"""Configuration: strict YAML, pydantic models, and ``file:line:col`` diagnostics.

Owns the YAML loader, the shared field types (durations, secrets), the site model and the profile lookup. No
``dict[str, Any]`` leaves this package: callers get validated, typed objects or a ``ConfigError``.
"""

from gateway.config.source import SourceMap, load_yaml, validate
from gateway.config.types import Duration, StrictModel, parse_duration

__all__ = ["Duration", "SourceMap", "StrictModel", "load_yaml", "parse_duration", "validate"]
