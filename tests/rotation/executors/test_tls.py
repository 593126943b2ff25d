"""TLS certificates: renewal with a new key, installed into the source, verified by a real handshake."""

from __future__ import annotations

import socket
import ssl
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from django.utils import timezone

from keyvault.models import ManagedSecret
from rotation import services
from rotation.executors.tls import PemBundle, _key_pem, _pem, issue
from tests.rotation.executors.conftest import rotate, steps

pytestmark = pytest.mark.django_db


class ReloadingTLSServer:
    """A TLS server on 127.0.0.1 that loads its certificate and key from ``load()`` on every connection."""

    def __init__(self, load):
        self.load = load
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with tempfile.TemporaryDirectory() as folder:
                pem = Path(folder) / "pair.pem"
                pem.write_text(self.load())
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(pem)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(2)
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

    def close(self):
        self.stopped.set()
        self.sock.close()
        self.thread.join(2)


def bundle_text(key, cert, chain=""):
    return _pem(cert) + chain + _key_pem(key)


@pytest.fixture
def internal_ca(file_source):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Keyvault test CA")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    file_source.write("pki/ca", bundle_text(key, cert))
    return PemBundle(bundle_text(key, cert))


@pytest.fixture
def served_cert(file_source, internal_ca, system_actor):
    """A certificate issued 80 days ago for 90 days (expires in 10), served by a reloading TLS server."""
    key, _, cert = issue(common_name="api.internal", sans=["api.internal", "127.0.0.1"], ca=internal_ca,
                         now=datetime.now(UTC) - timedelta(days=80))
    file_source.write("tls/api", bundle_text(key, cert, _pem(internal_ca.certificate)))
    server = ReloadingTLSServer(lambda: file_source.read("tls/api").value)
    secret = services.register_secret(
        name="api-tls", secret_type="tls_certificate", source="file", path="tls/api", owner="platform",
        actor=system_actor,
        config={"common_name": "api.internal", "sans": ["api.internal", "127.0.0.1"], "issuer": "internal_ca",
                "ca_ref": {"source": "file", "path": "pki/ca"}, "endpoint": f"127.0.0.1:{server.port}",
                "verify_attempts": 3},
    )
    yield secret, server, cert
    server.close()


def test_registration_reads_subject_sans_issuer_expiry_and_key_type(served_cert):
    secret, _, cert = served_cert
    secret.refresh_from_db()
    assert secret.expires_at == cert.not_valid_after_utc
    assert secret.metadata["subject"] == "CN=api.internal"
    assert secret.metadata["issuer"] == "CN=Keyvault test CA"
    assert secret.metadata["sans"] == ["api.internal", "127.0.0.1"]
    assert secret.metadata["key_type"] == "EC secp256r1" and secret.metadata["key_matches"] is True
    assert "PRIVATE" not in str(secret.metadata)


def test_renewal_installs_a_new_key_and_certificate_and_the_server_presents_it(served_cert, file_source, system_actor):
    # given: a certificate expiring in 10 days, inside the 30-day renewal window
    secret, server, old_cert = served_cert
    old = PemBundle(file_source.read("tls/api").value)
    assert services.secrets_needing_attention(timezone.now())[0][0] == secret
    t0 = timezone.now()

    # when
    run = rotate(secret, actor=system_actor, now=t0)

    # then: a new key and a CA-signed certificate, verified by a real handshake, recorded on the secret
    new = PemBundle(file_source.read("tls/api").value)
    secret.refresh_from_db()
    assert run.state == "retiring", run.last_error
    assert new.certificate.serial_number != old_cert.serial_number
    assert new.key.private_numbers() != old.key.private_numbers() and new.key_matches()
    assert new.certificate.issuer.rfc4514_string() == "CN=Keyvault test CA"
    assert secret.expires_at == new.certificate.not_valid_after_utc > t0 + timedelta(days=89)
    assert "presents the new certificate" in run.steps.get(key="verify.handshake").evidence
    assert run.executor_state["csr"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert "PRIVATE KEY" not in str(run.executor_state)
    assert services.secrets_needing_attention(t0) == []

    # when: the grace period is over
    services.execute_run(run.pk, now=t0 + timedelta(days=2))
    run.refresh_from_db()

    # then: the old version with the old private key is gone from the source
    assert run.state == "completed"
    versions = [v.version for v in file_source.list_versions("tls/api")]
    assert run.executor_state["previous_version"] not in versions


def test_a_server_that_keeps_the_old_certificate_fails_the_run_and_the_old_pair_is_restored(
    served_cert, file_source, system_actor
):
    # given: the server never reloads
    secret, server, _ = served_cert
    pinned = file_source.read("tls/api").value
    server.load = lambda: pinned

    # when
    run = rotate(secret, actor=system_actor)

    # then
    assert run.state == "failed" and "still presents another certificate" in run.last_error
    assert file_source.read("tls/api").value == pinned
    assert "restored" in run.last_error and steps(run)["rollback.restore"] == "done"


def test_self_signed_renewal_without_an_endpoint_checks_the_pair(file_source, system_actor):
    key, _, cert = issue(common_name="dev.local", sans=["dev.local"])
    file_source.write("tls/dev", bundle_text(key, cert))
    secret = services.register_secret(name="dev-tls", secret_type="tls_certificate", source="file", path="tls/dev",
                                      actor=system_actor, config={"common_name": "dev.local"})
    run = rotate(secret, actor=system_actor)
    new = PemBundle(file_source.read("tls/dev").value)
    assert run.state == "retiring"
    assert new.certificate.issuer == new.certificate.subject and new.key.curve.name == "secp256r1"
    assert "key and certificate match" in run.steps.get(key="verify.handshake").evidence


def test_a_value_that_is_not_a_certificate_is_reported_not_crashed(file_source, system_actor):
    file_source.write("tls/bad", "hello")
    secret = services.register_secret(name="bad-tls", secret_type="tls_certificate", source="file", path="tls/bad",
                                      actor=system_actor, config={"common_name": "x"})
    run = rotate(secret, actor=system_actor)
    assert run.state == "failed" and "no PEM certificate" in run.last_error
    assert ManagedSecret.objects.get(pk=secret.pk).status == "failed"


# -- issue 15: the emergency variant revokes the old certificate at its CA --------------------------------------


def test_an_emergency_run_adds_the_old_serial_to_the_internal_cas_crl_and_keeps_earlier_entries(
    file_source, internal_ca, system_actor
):
    # given: a served certificate whose secret names where the CA's CRL is kept
    key, _, cert = issue(common_name="pay.internal", sans=["pay.internal"], ca=internal_ca)
    file_source.write("tls/pay", bundle_text(key, cert, _pem(internal_ca.certificate)))
    server = ReloadingTLSServer(lambda: file_source.read("tls/pay").value)
    try:
        secret = services.register_secret(
            name="pay-tls", secret_type="tls_certificate", source="file", path="tls/pay", actor=system_actor,
            config={"common_name": "pay.internal", "issuer": "internal_ca", "ca_ref": {"source": "file", "path": "pki/ca"},
                    "crl_ref": {"source": "file", "path": "pki/crl"}, "endpoint": f"127.0.0.1:{server.port}",
                    "verify_attempts": 3})

        # when: the key is reported compromised and an emergency run goes through
        run = rotate(secret, actor=system_actor, kind="emergency", incident_ref="INC-15")

        # then: completed at once; the CRL, signed by the CA, lists the old serial as keyCompromise
        assert run.state == "completed", run.last_error
        crl = x509.load_pem_x509_crl(file_source.read("pki/crl").value.encode())
        assert crl.is_signature_valid(internal_ca.certificate.public_key())
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        assert entry is not None
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
        assert f"serial {cert.serial_number:x}" in run.steps.get(key="ca.revoke").evidence
        assert [v.version for v in file_source.list_versions("tls/pay")] == ["2"]  # the old key is gone

        # when: the new certificate is compromised too
        second = PemBundle(file_source.read("tls/pay").value).certificate
        run2 = rotate(secret, actor=system_actor, kind="emergency", incident_ref="INC-16")

        # then: both serials are listed
        assert run2.state == "completed", run2.last_error
        crl = x509.load_pem_x509_crl(file_source.read("pki/crl").value.encode())
        assert {e.serial_number for e in crl} == {cert.serial_number, second.serial_number}
    finally:
        server.close()


def test_without_a_crl_the_emergency_run_waits_for_a_person_to_revoke_at_the_ca(served_cert, file_source, system_actor):
    secret, _, cert = served_cert

    run = rotate(secret, actor=system_actor, kind="emergency", incident_ref="INC-15")

    # then: the new pair is live, and the run waits with the serial to revoke; the old key is still there
    assert run.state == "retiring" and "revoke the old certificate at the CA" in run.paused_reason
    assert f"serial {cert.serial_number:x}" in run.paused_reason
    assert len(file_source.list_versions("tls/api")) == 2

    # when: a person revoked it at the CA and ticks the step
    services.tick_manual_step(run, "ca.revoke", actor=system_actor, evidence="revoked in the CA console, keyCompromise")
    run = services.drive(run.pk)

    # then: the old version, with its key, is deleted
    assert run.state == "completed", run.last_error
    assert len(file_source.list_versions("tls/api")) == 1


def test_a_self_signed_emergency_run_has_no_ca_to_revoke_at_and_says_so(file_source, system_actor):
    key, _, cert = issue(common_name="dev.local", sans=["dev.local"])
    file_source.write("tls/dev", bundle_text(key, cert))
    secret = services.register_secret(name="dev-tls", secret_type="tls_certificate", source="file", path="tls/dev",
                                      actor=system_actor, config={"common_name": "dev.local"})

    run = rotate(secret, actor=system_actor, kind="emergency", incident_ref="INC-15")

    assert run.state == "completed", run.last_error
    assert run.steps.get(key="ca.revoke").evidence.startswith("self-signed: no CA to revoke at")


def test_a_crl_needs_the_internal_ca_that_signs_it(file_source, system_actor):
    from rotation.exceptions import ConfigFieldError

    with pytest.raises(ConfigFieldError, match="'crl_ref': only with issuer internal_ca"):
        services.register_secret(name="x-tls", secret_type="tls_certificate", source="file", path="tls/x",
                                 actor=system_actor, inspect=False,
                                 config={"common_name": "x.local", "crl_ref": {"source": "file", "path": "pki/crl"}})
