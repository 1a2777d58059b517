"""The one MQTT broker connection model, shared by the sensor driver (``mqtt_sources:`` entries) and the platform
uplink (``uplinks.platform``): broker address, keepalive, client id, TLS, credentials and how secrets are resolved.

Owns: ``MqttTlsConfig`` (``tls: {ca_file, cert_file, key_file, check_hostname, insecure_skip_verify}``),
``MqttConnectionConfig`` (the keys both sides share; each side's config model subclasses it and adds its own),
``BrokerAddress``, ``BrokerRotation`` (the failover state of one connection over a ``brokers:`` list) and
``tls_context`` (the one SSL context builder both clients use).

Brokers: either ``host`` (+ ``port``) or ``brokers:``, a list of ``host:port`` entries or ``mqtt://host:port`` /
``mqtts://host:port`` URLs (the nodes of one clustered broker, or a primary and its standby). A connection starts at
the first entry and, after a failed connect or a lost session, moves to the next one, round robin
(``BrokerRotation``). Of the moves in a row, the first ``len(brokers) - 1`` are immediate (the next node is most
likely up) and the next one waits the shared reconnect policy's delay (``gateway/reconnect.py``), so a whole cluster
away (or brokers that accept and then drop every connection) is retried with backoff, never in a tight loop.

Secrets: ``password`` (``${ENV}`` allowed) or ``password_file``. The file is read once at load, so a missing or
unreadable file is a config error with its position, and again at every connect (``resolved_password``), so a
password rotated on disk is used by the next connection without a restart. TLS files are not read at load: a site
names installation paths (``/etc/edge-gateway/...``) that exist only where it runs; ``check`` and ``run`` load them
in their preflight (each side's plugin), and every connect builds a fresh context, so renewed certificates are
picked up at the next connect too.

Must never import ssl, paho or aiomqtt at module level (a site file is validated without loading them), nor
anything of the runtime beyond ``gateway.config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, NamedTuple, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gateway.config.types import Duration, EnvStr, Secret, SecretStr, StrictModel, read_secret_file

if TYPE_CHECKING:
    import ssl

#: the IANA ports: MQTT over TCP, and over TLS
PLAIN_PORT = 1883
TLS_PORT = 8883


def site_relative_path(value: Any, info: ValidationInfo) -> Any:
    """Relative paths in a site file are relative to the site file, not to the working directory."""
    if value is None:
        return None
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    path = Path(value)
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


class MqttTlsConfig(StrictModel):
    """TLS toward the broker. ``tls: {}`` verifies the broker against the system trust store; ``ca_file`` against
    that CA; ``cert_file`` + ``key_file`` add a client certificate (mutual TLS)."""

    #: the keys the platform uplink used before both sides shared this model: a site still using them is told the
    #: new name (gateway.config.source) instead of getting a bare "unknown key"
    renamed_keys: ClassVar[Mapping[str, str]] = {"ca": "ca_file", "cert": "cert_file", "key": "key_file"}

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: false skips only the hostname check (a broker addressed by IP with a name-only certificate): the chain is
    #: still verified
    check_hostname: bool = True
    #: skips every check (chain and hostname): only for a lab broker with a self-signed certificate and no CA file,
    #: never in production
    insecure_skip_verify: bool = False

    _paths = field_validator("ca_file", "cert_file", "key_file", mode="before")(site_relative_path)

    @model_validator(mode="after")
    def _pairs(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        return self

    def files(self) -> tuple[Path | None, Path | None, Path | None]:
        """The files a context is built from, for messages about them."""
        return (self.ca_file, self.cert_file, self.key_file)


def tls_context(tls: MqttTlsConfig | None) -> ssl.SSLContext | None:
    """A fresh SSL context from ``tls`` (None: plain TCP). Raises OSError, ssl.SSLError or ValueError for files
    that do not load; callers word that with ``gateway.preflight.tls_message``."""
    if tls is None:
        return None
    import ssl  # here, not at import: loading a site file must not load OpenSSL

    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file is not None else None)
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.insecure_skip_verify:
        context.check_hostname = False  # must come first: CERT_NONE is refused while check_hostname is on
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = tls.check_hostname
    return context


class SecretFileError(OSError):
    """``password_file`` could not be read at a connect (removed or half-written during a rotation): an OSError, so
    both clients treat it as a failed connect and retry with their backoff instead of stopping."""


class BrokerAddress(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


_URL_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}


def parse_broker(entry: str, *, default_port: int) -> tuple[BrokerAddress, bool | None]:
    """One ``brokers:`` entry: ``host``, ``host:port``, ``[v6addr]:port`` or ``mqtt(s)://host[:port]``. Returns the
    address and whether the URL's scheme asks for TLS (None without a scheme). Raises ValueError with the reason."""
    text = entry.strip()
    if not text:
        raise ValueError("an empty broker entry")
    wants_tls: bool | None = None
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme.lower() not in _URL_SCHEMES:
            raise ValueError(f"{entry!r}: unknown scheme {scheme!r} (use mqtt:// or mqtts://)")
        wants_tls = _URL_SCHEMES[scheme.lower()]
        if wants_tls:
            default_port = TLS_PORT
        text = text.rstrip("/")
        if "/" in text or "@" in text or "?" in text:
            raise ValueError(f"{entry!r}: a broker URL is scheme://host:port only (credentials: username, password)")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r}: an IPv6 address is written [address]:port")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        raise ValueError(f"{entry!r}: an IPv6 address is written [address]:port")
    else:
        host, colon, port_text = text.partition(":")
        if colon and not port_text:
            raise ValueError(f"{entry!r}: the port after ':' is missing")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{entry!r}: not a host name")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    return BrokerAddress(host, port), wants_tls


class BrokerRotation:
    """Which broker of a list one connection uses, and how it fails over. Pure (no I/O, no clock); one per
    connection loop, owned by the side's client, which asks ``current`` at every connect.

    ``failed()`` moves to the next broker (round robin) and says whether that move may be made at once: of the moves
    in a row, the first ``len(brokers) - 1`` are immediate and the next one waits the shared backoff, then the count
    starts again. The count is not reset by a successful session: a pair of brokers that accept and then drop every
    connection costs at most one connect each per backoff delay (the policy's delay is reset by success, so the
    wait after a long good session is the short first one). A single broker never moves and always backs off."""

    __slots__ = ("_hops", "brokers", "failovers", "index")

    def __init__(self, brokers: tuple[BrokerAddress, ...]) -> None:
        if not brokers:
            raise ValueError("a broker rotation needs at least one broker")
        self.brokers = brokers
        self.index = 0
        #: moves to another broker since start (status, /metrics)
        self.failovers = 0
        self._hops = 0

    @property
    def current(self) -> BrokerAddress:
        return self.brokers[self.index]

    def failed(self) -> bool:
        """The current broker failed (connect refused or session lost): move on. True: connect again now; False:
        wait the reconnect policy's delay first."""
        if len(self.brokers) == 1:
            return False
        self.index = (self.index + 1) % len(self.brokers)
        self.failovers += 1
        self._hops += 1
        if self._hops >= len(self.brokers):
            self._hops = 0
            return False
        return True


class MqttConnectionConfig(StrictModel):
    """The keys of one broker connection, the same on both sides. Subclasses add what only their side has
    (subscriptions and sessions for sensors; the topic prefix, QoS and commands for the platform)."""

    #: one broker: ``host`` (+ ``port``), or several: ``brokers`` (exactly one of the two)
    host: EnvStr | None = None
    #: default 8883 with ``tls``, 1883 without
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    #: ``host:port`` entries or ``mqtt://`` / ``mqtts://`` URLs, tried in order, round robin on failure
    brokers: list[EnvStr] | None = None
    #: whole seconds on the wire; at least 1 (0 would switch keepalive off, and a stuck broker would go unnoticed)
    keepalive: Annotated[Duration, Field(ge=1, le=65535)] = 30.0
    client_id: str | None = None
    tls: MqttTlsConfig | None = None
    username: EnvStr | None = None
    password: SecretStr | None = None
    password_file: Path | None = None

    @field_validator("password_file", mode="before")
    @classmethod
    def _password_path(cls, value: Any, info: ValidationInfo) -> Any:
        path = site_relative_path(value, info)
        if path is not None:
            read_secret_file(path)  # fails at load, with the reason, rather than at the first connect
        return path

    @model_validator(mode="after")
    def _broker_form(self) -> Self:
        if self.brokers is None:
            if self.host is None:
                raise ValueError("give the broker: host (and port), or brokers: [host:port, ...]")
            if not self.host.strip():
                raise ValueError("host is empty")
            return self
        if self.host is not None or self.port is not None:
            raise ValueError("give either host/port or brokers, not both")
        if not self.brokers:
            raise ValueError("brokers is empty: list at least one host:port")
        seen: set[BrokerAddress] = set()
        for i, entry in enumerate(self.brokers):
            try:
                address, wants_tls = parse_broker(entry, default_port=self.effective_port)
            except ValueError as exc:
                raise ValueError(f"brokers[{i}]: {exc}") from None
            if wants_tls is True and self.tls is None:
                raise ValueError(f"brokers[{i}]: {entry!r} is an mqtts:// URL but there is no tls: section")
            if wants_tls is False and self.tls is not None:
                raise ValueError(f"brokers[{i}]: {entry!r} is a plain mqtt:// URL but tls: is configured")
            if address in seen:
                raise ValueError(f"brokers[{i}]: {address} is listed twice")
            seen.add(address)
        return self

    @model_validator(mode="after")
    def _credentials(self) -> Self:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("a password needs a username")
        return self

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return TLS_PORT if self.tls is not None else PLAIN_PORT

    def broker_list(self) -> tuple[BrokerAddress, ...]:
        """Every broker of this connection, in the order they are tried (one for ``host``)."""
        if self.brokers is None:
            assert self.host is not None  # _broker_form
            return (BrokerAddress(self.host, self.effective_port),)
        return tuple(parse_broker(entry, default_port=self.effective_port)[0] for entry in self.brokers)

    def broker(self, rotation: BrokerRotation | None = None) -> BrokerAddress:
        """Where to connect: the rotation's current broker (both clients ask this at every connect and name it in
        their log lines), or the first one without a rotation."""
        if rotation is not None:
            return rotation.current
        return self.broker_list()[0]

    def rotation(self) -> BrokerRotation:
        """A fresh failover state over this connection's brokers (one per connection loop)."""
        return BrokerRotation(self.broker_list())

    def resolved_password(self) -> Secret | None:
        """The password, read from ``password_file`` at each call (each connect) so a rotated secret is used."""
        if self.password_file is not None:
            try:
                return read_secret_file(self.password_file)
            except ValueError as exc:
                raise SecretFileError(str(exc)) from exc
        return self.password
