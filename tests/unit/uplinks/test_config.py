"""The ``uplinks:`` section of a site file: secrets from files, and every mistake reported at its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.site import load_site
from gateway.errors import ConfigError


def site_with(tmp_path: Path, uplinks: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        "version: 1\ngateway: {id: gw1, site: tower}\n"
        "devices:\n  - {id: m1, driver: simulator, profile: sim-energy-meter}\n"
        f"uplinks:\n{uplinks}"
    )
    return path


def test_a_full_configuration_loads_with_secrets_from_files_never_shown(tmp_path: Path) -> None:
    (tmp_path / "influx.token").write_text("s3cr3t-token\n")
    (tmp_path / "mqtt.pw").write_text("pw-123\n")
    site = load_site(
        site_with(
            tmp_path,
            "  influx: {url: 'https://eu-central-1-1.aws.cloud2.influxdata.com/', org: acme, bucket: building,"
            " token_file: influx.token, delivery: {batch_size: 2000, retry_max: 2min}}\n"
            "  platform: {host: broker.city.example, prefix: city, username: gw1, password_file: mqtt.pw, tls: {}}\n",
        )
    )
    influx, platform = site.config.uplinks.influx, site.config.uplinks.platform
    assert influx is not None and platform is not None
    assert influx.url == "https://eu-central-1-1.aws.cloud2.influxdata.com"
    assert influx.token is not None and influx.token.reveal() == "s3cr3t-token"
    assert influx.delivery.retry_max == 120.0
    # the platform's password file is read at every connect (gateway/mqtt_connection.py), not copied at load
    password = platform.resolved_password()
    assert password is not None and password.reveal() == "pw-123"
    assert platform.effective_port == 8883  # TLS
    shown = repr(site.config.uplinks) + str(site.config.uplinks.model_dump())
    assert "s3cr3t" not in shown and "pw-123" not in shown


def test_token_from_the_environment(tmp_path: Path) -> None:
    site = load_site(
        site_with(tmp_path, "  influx: {url: 'http://localhost:8086', org: o, bucket: b, token: '${INFLUX_TOKEN}'}\n"),
        env={"INFLUX_TOKEN": "from-env"},
    )
    assert site.config.uplinks.influx is not None
    assert site.config.uplinks.influx.token == "from-env"


@pytest.mark.parametrize(
    ("uplinks", "line", "message"),
    [
        ("  influx: {url: 'http://x', org: o, bucket: b, token_file: missing.token}\n", 6, "cannot read secret file"),
        ("  influx: {url: 'localhost:8086', org: o, bucket: b}\n", 6, "must start with http"),
        ("  influx: {url: 'http://x', org: o, bucket: b, token: a, token_file: t}\n", 6, "either token or token_file"),
        ("  influx: {url: 'http://x', org: o, bucket: b, batchsize: 5}\n", 6, "unknown key 'batchsize'"),
        ("  influx:\n    url: 'http://x'\n    org: o\n    bucket: b\n    delivery: {retry_min: 5s, retry_max: 1s}\n",
         10, "retry_max must be at least retry_min"),
        ("  platform: {host: h, prefix: 'city/#'}\n", 6, "without wildcards"),
        ("  platform: {host: h, password: x}\n", 6, "needs a username"),
        ("  platform: {host: h, tls: {cert_file: c.pem}}\n", 6, "both cert_file and key_file"),
        ("  platform: {host: h, tls: {ca: nowhere.pem}}\n", 6, "uplinks.platform.tls.ca was renamed ca_file"),
        ("  platform: {host: h, password_file: nowhere.pw, username: u}\n", 6, "cannot read secret file"),
        ("  platform: {host: h, qos: 2}\n", 6, "qos"),
    ],
)  # fmt: skip
def test_mistakes_are_config_errors_at_their_line(tmp_path: Path, uplinks: str, line: int, message: str) -> None:
    path = site_with(tmp_path, uplinks)
    with pytest.raises(ConfigError) as caught:
        load_site(path)
    text = str(caught.value)
    assert message in text
    assert f"{path}:{line}:" in text
