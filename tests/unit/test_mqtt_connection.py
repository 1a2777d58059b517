"""The shared MQTT connection model (gateway/mqtt_connection.py): one set of keys for ``mqtt_sources:`` entries and
``uplinks.platform``, one SSL context builder, the renamed keys told by their new name, and password files read at
every connect."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from drivers.mqtt.config import MqttSourceConfig
from gateway.cli import build_parser
from gateway.config.site import load_site
from gateway.errors import ConfigError
from gateway.mqtt_connection import MqttConnectionConfig, MqttTlsConfig, SecretFileError, tls_context
from gateway.uplinks.config import PlatformConfig
from tests.integration.uplinks.test_platform_tls import make_pki

TLS = "{ca_file: pki/ca.pem, cert_file: pki/client.pem, key_file: pki/client.key, check_hostname: false}"


def both_sides(
    tmp_path: Path, tls: str, *, password_file: str = "mqtt.password"
) -> tuple[MqttSourceConfig, PlatformConfig]:
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\n"
        "gateway: {id: gw1, site: lab}\n"
        "http: {enabled: false}\n"
        "mqtt_sources:\n"
        f"  - {{id: building, host: 127.0.0.1, username: gw1, password_file: {password_file}, tls: {tls},\n"
        "      subscriptions: [{id: z2m, topic: 'zigbee2mqtt/+', decoder: {type: zigbee2mqtt}}]}\n"
        "devices:\n"
        "  - {id: lobby, driver: mqtt, source: building, points: {temperature: {unit: degC}}}\n"
        "uplinks:\n"
        f"  platform: {{host: 127.0.0.1, username: gw1, password_file: {password_file}, tls: {tls}}}\n"
    )
    loaded = load_site(site)
    (source,) = loaded.config.section("mqtt_sources", MqttSourceConfig)
    platform = loaded.config.uplinks.configured("platform")
    assert isinstance(platform, PlatformConfig)
    return source, platform


@pytest.fixture
def pki_site(tmp_path: Path) -> Path:
    (tmp_path / "pki").mkdir()
    make_pki(tmp_path / "pki")
    (tmp_path / "mqtt.password").write_text("first\n")
    return tmp_path


def test_both_sides_read_the_same_keys_into_the_same_model(pki_site: Path) -> None:
    source, platform = both_sides(pki_site, TLS)
    assert isinstance(source, MqttConnectionConfig) and isinstance(platform, MqttConnectionConfig)
    assert type(source.tls) is type(platform.tls) is MqttTlsConfig
    assert source.tls == platform.tls
    # relative to the site file, on both sides
    assert source.tls is not None and source.tls.ca_file == pki_site / "pki" / "ca.pem"
    assert source.broker() == platform.broker() == ("127.0.0.1", 8883)  # TLS: 8883 by default, both sides
    assert source.keepalive == platform.keepalive == 30.0


def test_both_sides_build_the_same_ssl_context(pki_site: Path) -> None:
    source, platform = both_sides(pki_site, TLS)
    contexts = [tls_context(source.tls), tls_context(platform.tls)]
    assert all(isinstance(c, ssl.SSLContext) for c in contexts)
    first, second = (c for c in contexts if c is not None)
    assert first is not second  # a fresh context per connect: renewed files are picked up
    assert first.verify_mode == second.verify_mode == ssl.CERT_REQUIRED
    assert first.check_hostname is second.check_hostname is False
    assert first.get_ca_certs() == second.get_ca_certs()
    assert [c["subject"] for c in first.get_ca_certs()] == [((("commonName", "test city CA"),),)]


def test_hostname_and_insecure_switches(pki_site: Path) -> None:
    strict = tls_context(MqttTlsConfig())
    assert strict is not None and strict.check_hostname and strict.verify_mode == ssl.CERT_REQUIRED
    name_only = tls_context(MqttTlsConfig(check_hostname=False))
    assert name_only is not None and not name_only.check_hostname and name_only.verify_mode == ssl.CERT_REQUIRED
    insecure = tls_context(MqttTlsConfig(insecure_skip_verify=True))
    assert insecure is not None and not insecure.check_hostname and insecure.verify_mode == ssl.CERT_NONE
    assert tls_context(None) is None


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ("{ca: pki/ca.pem}", "tls.ca was renamed ca_file"),
        ("{ca_file: pki/ca.pem, cert: pki/client.pem, key_file: pki/client.key}", "tls.cert was renamed cert_file"),
        ("{ca_file: pki/ca.pem, cert_file: pki/client.pem, key: pki/client.key}", "tls.key was renamed key_file"),
    ],
)
def test_the_old_uplink_tls_keys_name_their_new_name_on_both_sides(pki_site: Path, tls: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        both_sides(pki_site, tls)
    text = str(caught.value)
    assert f"mqtt_sources.0.{message}" in text
    assert f"uplinks.platform.{message}" in text
    assert "unknown key" not in text


def test_a_client_certificate_needs_both_files(pki_site: Path) -> None:
    with pytest.raises(ConfigError, match="needs both cert_file and key_file"):
        both_sides(pki_site, "{cert_file: pki/client.pem}")


def test_a_missing_password_file_fails_at_load_on_both_sides(pki_site: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        both_sides(pki_site, TLS, password_file="nowhere.password")
    text = str(caught.value)
    assert text.count("cannot read secret file") == 2, text


def test_the_password_file_is_read_again_at_every_connect(pki_site: Path) -> None:
    source, platform = both_sides(pki_site, TLS)
    for side in (source, platform):
        assert side.password is None  # not copied at load: the file stays the source of truth
        secret = pki_site / "mqtt.password"
        secret.write_text("first\n")
        first = side.resolved_password()
        assert first is not None and first.reveal() == "first"
        secret.write_text("rotated\n")
        rotated = side.resolved_password()
        assert rotated is not None and rotated.reveal() == "rotated"
        assert "rotated" not in repr(side)
        secret.unlink()  # mid-rotation: a failed connect (an OSError, retried), not a crash of the client
        with pytest.raises(SecretFileError, match="cannot read secret file"):
            side.resolved_password()


def test_check_reports_a_missing_tls_file_on_both_sides(
    pki_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """TLS files are not read at load (a site names installation paths); ``check`` loads them, each side's."""
    both_sides(pki_site, "{ca_file: pki/nowhere.pem}")  # loads
    args = build_parser().parse_args(["check", str(pki_site / "site.yaml"), "--data-dir", str(tmp_path / "data")])
    assert args.handler(args) == 1
    err = capsys.readouterr().err
    missing = pki_site / "pki" / "nowhere.pem"
    assert err.count(f"cannot load the TLS files ({missing})") == 2, err
