"""The platform uplink over mutual TLS with a username and a password file, against a real Mosquitto that requires
both a client certificate and credentials; and the same gateway without its client certificate, which must not get
in (and must keep its data)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import ssl
import subprocess
from pathlib import Path

import aiomqtt
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config.site import load_site
from gateway.outbox import Outbox
from gateway.uplinks.runner import build_uplinks
from tests.integration.uplinks.common import FAST_DELIVERY, CommandRecorder, readings, wait_for, write_site
from tests.services import Mosquitto

pytestmark = pytest.mark.integration


def _write_key_and_cert(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def make_pki(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test city CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key_and_cert(directory, "ca", ca, ca_key)
    for name, san in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gw1-{name}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        _write_key_and_cert(directory, name, builder.sign(ca_key, hashes.SHA256()), key)


class TlsMosquitto(Mosquitto):
    """Mosquitto with one TLS listener requiring a client certificate signed by the test CA and a password."""

    def command(self) -> list[str]:
        make_pki(self.dir)
        passwords = self.dir / "passwords"
        passwords.write_text("")
        subprocess.run(["mosquitto_passwd", "-b", str(passwords), "gw1", "pa55-w0rd"], check=True)
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {self.dir / 'ca.pem'}\ncertfile {self.dir / 'server.pem'}\nkeyfile {self.dir / 'server.key'}\n"
            "require_certificate true\n"
            f"allow_anonymous false\npassword_file {passwords}\n"
            "log_dest stdout\nlog_type error\nuser root\n"
        )
        return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]


@pytest.fixture
def tls_broker() -> object:
    broker = TlsMosquitto()
    broker.start()
    yield broker
    broker.close()


def site_for(tmp_path: Path, broker: TlsMosquitto, *, client_cert: bool) -> object:
    (tmp_path / "mqtt.password").write_text("pa55-w0rd\n")
    pki = broker.dir
    cert = f", cert_file: '{pki / 'client.pem'}', key_file: '{pki / 'client.key'}'" if client_cert else ""
    uplinks = (
        f"  platform: {{host: 127.0.0.1, port: {broker.port}, prefix: tls, username: gw1,"
        f" password_file: mqtt.password, tls: {{ca_file: '{pki / 'ca.pem'}'{cert}}}, delivery: {FAST_DELIVERY}}}\n"
    )
    return load_site(write_site(tmp_path, uplinks))


async def test_mutual_tls_with_credentials_delivers(tmp_path: Path, tls_broker: TlsMosquitto) -> None:
    site = site_for(tmp_path, tls_broker, client_cert=True)
    outbox = Outbox(tmp_path / "outbox.db")
    t0 = 1_790_600_000_000
    await outbox.append(readings(0, 3, t0_ms=t0))
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())  # type: ignore[arg-type]
    context = ssl.create_default_context(cafile=str(tls_broker.dir / "ca.pem"))
    context.load_cert_chain(str(tls_broker.dir / "client.pem"), str(tls_broker.dir / "client.key"))
    received: list[dict[str, object]] = []
    async with aiomqtt.Client(
        "127.0.0.1", port=tls_broker.port, username="gw1", password="pa55-w0rd", tls_context=context,
        identifier="platform-tls",
    ) as platform:  # fmt: skip
        await platform.subscribe("tls/tower/gw1/telemetry/#", qos=1)
        stopping = asyncio.Event()

        async def collect() -> None:
            async for message in platform.messages:
                received.append(orjson.loads(message.payload))  # type: ignore[arg-type]  # noqa: PERF401 (watched live)

        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(runner.run(stopping))
            listener = tg.create_task(collect())
            await wait_for(lambda: len(received) == 3, what="telemetry over mTLS")
            stopping.set()
            await run
            listener.cancel()
    await outbox.close()
    assert [m["ts"] for m in received] == [t0, t0 + 1, t0 + 2]


async def test_without_its_client_certificate_the_gateway_is_refused_and_keeps_the_data(
    tmp_path: Path, tls_broker: TlsMosquitto
) -> None:
    site = site_for(tmp_path, tls_broker, client_cert=False)
    outbox = Outbox(tmp_path / "outbox.db")
    await outbox.append(readings(0, 3))
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())  # type: ignore[arg-type]
    stopping = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(runner.run(stopping))
        await wait_for(lambda: runner.status()["requests_failed"] >= 2, what="refused attempts")
        stopping.set()
    status = runner.status()
    assert status["backlog_samples"] == 6
    assert status["sent_samples"] == 0
    assert "not connected" in str(status["last_error"])
    await outbox.close()
