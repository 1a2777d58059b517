"""Uplink config models (PLACEHOLDER: issue #6 fills in InfluxDB and platform MQTT settings)."""

from __future__ import annotations

from gateway.config.types import StrictModel


class UplinksConfig(StrictModel):
    pass
