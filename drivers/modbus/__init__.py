"""Modbus TCP/RTU driver (pymodbus is imported only inside this package, and only by its client module)."""
