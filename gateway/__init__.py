"""Smart-building IoT edge gateway.

Owns the runtime (model, config, bus, outbox, uplinks, supervisor, CLI). Protocol libraries are imported only by
``drivers/`` (pymodbus, the sensor-side MQTT client) and ``gateway/uplinks/`` (influxdb-client, the platform client).
"""

__version__ = "0.1.0"
