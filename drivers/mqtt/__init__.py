"""MQTT sensor ingestion driver (aiomqtt/paho are imported only by its client module)."""
