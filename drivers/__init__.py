"""Protocol drivers: one sub-package per protocol. The only place device-side protocol libraries are imported.

Importing a driver package must stay cheap: its ``config`` module imports no protocol library, so the gateway can
validate a site file without loading pymodbus or paho.
"""
