"""The built-in uplinks as plugins (entry points ``influx`` and ``platform`` in ``edge_gateway.uplinks``).

Imports the config models only: influxdb-client and paho are imported by ``build``, when a site configures them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.config.types import StrictModel
from gateway.plugins import UplinkContext, UplinkPlugin
from gateway.status import UplinkRunnerPart
from gateway.uplinks.config import InfluxConfig, PlatformConfig

if TYPE_CHECKING:
    from gateway.config.site import Site
    from gateway.errors import Diagnostic


class InfluxPlugin(UplinkPlugin):
    """``uplinks.influx``: InfluxDB 2 / InfluxDB Cloud (or anything that speaks its write API)."""

    name = "influx"
    config_model = InfluxConfig

    def build(self, config: StrictModel, context: UplinkContext) -> UplinkRunnerPart:
        assert isinstance(config, InfluxConfig)
        from gateway.uplinks.influx import InfluxUplink
        from gateway.uplinks.runner import UplinkRunner

        influx = InfluxUplink(config, site=context.site)
        return UplinkRunner("uplink[influx]", influx, context.outbox, config.delivery, cursor_name="influx")


class PlatformPlugin(UplinkPlugin):
    """``uplinks.platform``: the city platform's MQTT broker (docs/platform-contract.md), with its commands."""

    name = "platform"
    config_model = PlatformConfig

    def build(self, config: StrictModel, context: UplinkContext) -> UplinkRunnerPart:
        assert isinstance(config, PlatformConfig)
        from gateway.uplinks.mqtt import MqttUplink
        from gateway.uplinks.runner import UplinkRunner

        site, outbox = context.site, context.outbox
        if not config.commands:
            mqtt = MqttUplink(config, site=site)
        else:
            from gateway.command_journal import JOURNAL_FILE, CommandJournal
            from gateway.incentives.record import load_public_key
            from gateway.platform_commands import PlatformCommands

            public_key = None
            if config.command_public_key_file is not None:
                public_key = load_public_key(config.command_public_key_file)
            journal = CommandJournal((context.data_dir or outbox.path.parent) / JOURNAL_FILE)
            platform_commands = PlatformCommands(
                context.commands,
                outbox,
                journal,
                gateway_id=site.config.gateway.id,
                max_age=config.command_max_age,
                max_skew=config.command_max_skew,
                public_key=public_key,
                time_ns=context.time_ns or time.time_ns,
            )
            mqtt = MqttUplink(
                config,
                site=site,
                on_command=platform_commands.handle,
                before_commands=platform_commands.recover,
                on_close=platform_commands.close,
            )
        return UplinkRunner("uplink[platform]", mqtt, outbox, config.delivery, cursor_name="platform")

    def preflight(self, site: Site, config: StrictModel) -> list[Diagnostic]:
        """The platform's command public key and its TLS files, loaded (never connected)."""
        assert isinstance(config, PlatformConfig)
        problems: list[Diagnostic] = []
        if config.commands and config.command_public_key_file is not None:
            from gateway.incentives.record import KeyFileError, load_public_key

            try:
                load_public_key(config.command_public_key_file)
            except KeyFileError as exc:
                problems.append(site.diagnostic(("uplinks", "platform", "command_public_key_file"), str(exc)))
        if config.tls is not None:
            import ssl

            from gateway.mqtt_connection import tls_context
            from gateway.preflight import tls_message

            try:
                tls_context(config.tls)
            except (OSError, ssl.SSLError, ValueError) as exc:
                problems.append(site.diagnostic(("uplinks", "platform", "tls"), tls_message(config.tls.files(), exc)))
        return problems


influx = InfluxPlugin()
platform = PlatformPlugin()
