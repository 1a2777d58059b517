"""BACnet/IP driver (bacpypes3): see README.md."""
