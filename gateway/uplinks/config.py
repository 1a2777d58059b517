"""Config models of the uplinks (site key ``uplinks:``): InfluxDB 2 / Cloud and the city-platform MQTT broker.

Owns validation only; imports no protocol library (loading a site file must stay cheap). Secrets are ``SecretStr``
(``${ENV}`` allowed) or ``*_file`` paths read at load time, so a missing token file is a config error with a
position, not a runtime surprise; the platform's ``password_file`` is also re-read at every connect (the shared MQTT
connection model, gateway/mqtt_connection.py). Neither ever appears in a repr or a log line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator, model_validator

from gateway.config.types import Duration, EnvStr, PositiveDuration, Secret, SecretStr, StrictModel, read_secret_file
from gateway.mqtt_connection import MqttConnectionConfig, site_relative_path

#: relative paths in a site file are relative to the site file, not to the working directory
_resolve_path = site_relative_path


class DeliveryConfig(StrictModel):
    """How the shared uplink runner paces one uplink (the same knobs for every uplink)."""

    #: samples (or events) per request; InfluxDB is happiest with a few thousand lines per write
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 5000
    #: requests in flight at once (live and backlog together)
    max_inflight: Annotated[int, Field(ge=1, le=64)] = 4
    #: share of the in-flight requests that backlog replay may use while live data is waiting
    replay_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    #: data older than this when it is first sent is backfill: sent behind live data and flagged historical
    live_window: PositiveDuration = 10.0
    #: first retry delay; doubles each failure (+-20 % jitter, the shared reconnect policy) up to ``retry_max``
    retry_min: PositiveDuration = 0.5
    retry_max: PositiveDuration = 60.0
    #: one request taking longer than this counts as failed (retryable)
    timeout: PositiveDuration = 10.0
    #: after new data wakes an idle runner, wait this long for the rest of the poll cycle before reading it, so the
    #: polls of many devices leave in one request (one outbox read, one cursor write) rather than one request each;
    #: 0 sends each stored batch as soon as it is committed. The most it adds to a reading's latency
    linger: Annotated[Duration, Field(ge=0, le=10)] = 0.1

    @model_validator(mode="after")
    def _retry_order(self) -> DeliveryConfig:
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max must be at least retry_min")
        return self


class InfluxConfig(StrictModel):
    """``influx: {url, org, bucket, token_file}`` — InfluxDB 2 OSS, InfluxDB Cloud, or anything speaking its v2
    write API (VictoriaMetrics)."""

    url: EnvStr
    org: EnvStr
    bucket: EnvStr
    token: SecretStr | None = None
    token_file: Path | None = None
    gzip: bool = True
    delivery: DeliveryConfig = DeliveryConfig()
    #: tags added to every line, besides ``site`` and ``gateway`` (which are always there)
    extra_tags: dict[str, str] = Field(default_factory=dict)
    #: also write personal points (apartment meters): only for an InfluxDB inside the building, run by the same
    #: operator under the same data-protection rules as the gateway itself (docs/privacy.md)
    include_personal: bool = False

    _token_path = field_validator("token_file", mode="before")(_resolve_path)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https:// (got {value!r})")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_token(self) -> InfluxConfig:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give either token or token_file, not both")
        if self.token_file is not None:
            object.__setattr__(self, "token", read_secret_file(self.token_file))
        return self

    def token_value(self) -> Secret | None:
        return self.token


class PlatformConfig(MqttConnectionConfig):
    """``platform:`` the city-platform MQTT broker and the topic contract's prefix. The connection keys (host, port,
    keepalive, client_id, tls, username, password/password_file) are the ones ``mqtt_sources:`` entries have
    (gateway/mqtt_connection.py); ``client_id`` defaults to ``edge-gateway-{site}-{gateway}``."""

    #: topics are ``{prefix}/{site}/{gateway}/...``
    prefix: str = "city"
    qos: Literal[0, 1] = 1
    #: unacknowledged QoS 1 messages at once (paho collapses with tens of thousands outstanding)
    max_inflight_messages: Annotated[int, Field(ge=1, le=10_000)] = 1000
    #: telemetry payload version (docs: gateway/uplinks/README.md). 1: one message per device and read time (a
    #: device read in two requests sends two per poll). 2: one message per device and poll, its reads listed with
    #: their own times; half the messages or fewer, for a platform that reads ``"v": 2``
    telemetry_version: Literal[1, 2] = 1
    #: messages are published in order from one request; 2 requests let live data pass a replay. A shorter
    #: retry_max than InfluxDB's: the broker is back as soon as it reconnects, and backfill should follow quickly
    delivery: DeliveryConfig = DeliveryConfig(batch_size=2000, max_inflight=2, retry_max=10.0)
    #: accept write commands on ``cmd/write``; off means the subscription is not even made
    commands: bool = True
    #: a command older than this (by its required ``ts``) is refused as stale; at most a day, far inside the 7 days
    #: the command journal remembers an id, so an id is never forgotten while a command could still be accepted
    command_max_age: Annotated[Duration, Field(gt=0, le=86_400)] = 60.0
    #: a command whose ``ts`` is further than this ahead of the gateway clock is refused
    command_max_skew: Annotated[Duration, Field(ge=0, le=3_600)] = 5.0
    #: the platform's Ed25519 public key (PEM): when set, only commands signed with it are applied (docs/commands.md)
    command_public_key_file: Path | None = None

    _key_path = field_validator("command_public_key_file", mode="before")(_resolve_path)

    @field_validator("prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or value.endswith("/") or any(c in value for c in "#+\0"):
            raise ValueError("prefix must be a non-empty topic without wildcards or leading/trailing '/'")
        return value

    @model_validator(mode="after")
    def _key_file(self) -> PlatformConfig:
        if self.command_public_key_file is not None and not self.command_public_key_file.is_file():
            raise ValueError(f"command_public_key_file not found: {self.command_public_key_file}")
        return self


class UplinksConfig(StrictModel):
    """``uplinks:``: one optional key per installed uplink plugin (``influx:``, ``platform:``), the key being the
    plugin's name. The model validated is ``gateway.config.site.uplinks_model()``, assembled from the registry
    (gateway/plugins.py); this base only holds the typed accessor."""

    if TYPE_CHECKING:
        # what the built-in plugins add; typed here for code that names them (tests, docs examples)
        influx: InfluxConfig | None
        platform: PlatformConfig | None

    def configured(self, name: str) -> StrictModel | None:
        """The config of the uplink named ``name``, or None when the site does not configure it."""
        value = self.__dict__.get(name)
        return value if isinstance(value, StrictModel) else None

    def configured_names(self) -> list[str]:
        """The uplinks the site configures, in the registry's order."""
        return [name for name in type(self).model_fields if self.configured(name) is not None]
