"""The gateway's HTTP face: status page, JSON API, health probes and Prometheus metrics, plus the ``status`` command.

``views`` turns a running gateway into plain JSON-ready data (shared by the API, the page and the CLI); ``page``
renders the HTML; ``server`` wires them into an aiohttp application; ``cli`` is ``edge-gateway status``.
Nothing here imports a protocol library or a driver: it only reads what the supervisor exposes.
"""
