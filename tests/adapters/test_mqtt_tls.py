"""TLS with a client certificate plus username/password: a private Mosquitto that requires both
(certificates made by the test), and the adapter's values reach the ingest stream."""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nats.aio.client import Client as NATS
from paho.mqtt.enums import CallbackAPIVersion

from tests.adapters.conftest import _reachable
from tests.adapters.test_mqtt import adapter_config, rows_on_stream, running
from tests.conftest import free_port, require, stop_process
from twinstore.bus.ingest import IngestSubjects, Update

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    ip: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


async def test_tls_with_client_certificate_and_password(
    ingest: tuple[NATS, IngestSubjects], prefix: str, nats_url: str, tmp_path: Path
) -> None:
    require(
        Path(MOSQUITTO).exists() and shutil.which("mosquitto_passwd"),
        "mosquitto (with mosquitto_passwd) is not installed",
    )
    nc, subjects = ingest
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("test-ca", ca_key, None, ca_key, ca=True)
    _write(tmp_path / "ca", ca)
    _write(tmp_path / "server", _cert("127.0.0.1", server_key, ca, ca_key, ip="127.0.0.1"), server_key)
    _write(tmp_path / "client", _cert("adapter", client_key, ca, ca_key), client_key)
    passwords = tmp_path / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "adapter", "s3cret"], check=True, timeout=30
    )
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
        f"cafile {tmp_path / 'ca.pem'}\ncertfile {tmp_path / 'server.pem'}\n"
        f"keyfile {tmp_path / 'server.key'}\n"
        "require_certificate true\npersistence false\n"
    )
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _reachable("127.0.0.1", port):
            assert broker.poll() is None and time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
        tls = {
            "ca": str(tmp_path / "ca.pem"),
            "cert": str(tmp_path / "client.pem"),
            "key": str(tmp_path / "client.key"),
        }
        mqtt_cfg = {"username": "adapter", "password": "s3cret", "tls": tls}
        mapping = {
            "topic": f"{prefix}/{{thing}}/v",
            "thing": "org.acme:{thing}",
            "feature": "f",
            "property": "v",
        }
        config = adapter_config(
            prefix, nats_url, f"mqtts://127.0.0.1:{port}", tmp_path, mappings=[mapping], mqtt=mqtt_cfg
        )
        async with running(config):
            device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="device")
            device.username_pw_set("adapter", "s3cret")
            device.tls_set(
                ca_certs=tls["ca"], certfile=tls["cert"], keyfile=tls["key"], cert_reqs=ssl.CERT_REQUIRED
            )
            device.connect("127.0.0.1", port)
            device.loop_start()
            try:
                device.publish(f"{prefix}/m1/v", json.dumps(42), qos=1).wait_for_publish(5)
                rows = await rows_on_stream(nc, subjects, 1)
            finally:
                device.disconnect()
                device.loop_stop()
        assert rows == [Update("org.acme:m1", "/features/f/properties/v", 42)]
    finally:
        stop_process(broker, 10)
