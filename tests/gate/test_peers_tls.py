"""Peers reached the way an operator would set them up between nodes: https with a private CA given to the gate
in ``SSL_CERT_FILE`` (a real TLS server on loopback, its certificate made here), plain http warned about at
start, and the client's cookies kept from peers (its Authorization goes: the peer needs it)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
from pathlib import Path

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from spotguard.gate.control import call
from tests.support._gate_process import GateProcess, gate_process
from tests.support._quirky_engine import quirky_engine
from tests.support.openai_upstream import FakeEngine

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"


def private_ca(tmp: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA (its PEM written to ca.pem) and a server context with a certificate it signed for 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spotguard test fleet CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "peer.pem", tmp / "peer.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    return ca_file, server


async def handed_off(gate: GateProcess) -> httpx.Response:
    """A new request to a draining gate: it goes to a peer, as sent."""
    await call(gate.control, "draining", timeout=5, on=True, deadline=None)
    async with httpx.AsyncClient(timeout=20) as http:
        return await http.post(gate.url + CHAT, headers={"Authorization": "Bearer sk-user-1",
                                                         "Cookie": "session=secret-session"},
                               content=json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))


async def test_https_peers_are_verified_against_the_ca_in_ssl_cert_file_and_get_no_cookies(
        fake_engine: FakeEngine, tmp_path: Path) -> None:
    ca_file, server = private_ca(tmp_path)
    async with quirky_engine(server) as peer:
        peers = f'peers = ["{peer.url}"]'
        with anyio.fail_after(60):
            with gate_process(tmp_path, fake_engine.url, peers, env={**os.environ, "SSL_CERT_FILE": str(ca_file)},
                              name="trusting") as gate:
                answer = await handed_off(gate)
            with gate_process(tmp_path, fake_engine.url, peers, name="untrusting") as gate:
                refused = await handed_off(gate)  # the system store alone does not know the fleet's CA
    assert answer.status_code == 200 and answer.json()["path"] == CHAT, answer.text
    [seen] = peer.seen
    assert seen.headers["authorization"] == "Bearer sk-user-1"
    assert "cookie" not in seen.headers and b"secret-session" not in seen.body
    assert refused.status_code == 503 and refused.headers["retry-after"], refused.text


async def test_a_plain_http_peer_on_another_machine_is_warned_about_at_start(fake_engine: FakeEngine,
                                                                             tmp_path: Path) -> None:
    peers = 'peers = ["http://10.255.255.1:8080", "https://10.255.255.2:8443", "http://127.0.0.1:9"]'
    with anyio.fail_after(30), gate_process(tmp_path, fake_engine.url, peers) as gate:
        await call(gate.control, "hello", timeout=5)
        warned = [json.loads(line) for line in gate.log_text().splitlines() if '"gate_peer_cleartext"' in line]
    assert [w["peer"] for w in warned] == ["http://10.255.255.1:8080"]
    assert warned[0]["level"] == "warning" and "Authorization" in warned[0]["why"]
