"""Uplinks: InfluxDB and the city-platform MQTT client. The only gateway modules importing their libraries."""
