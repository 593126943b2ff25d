"""TLS certificates: track expiry, renew with a new private key, install, verify by a real handshake.

A certificate lives in its secret source as a PEM bundle: the certificate (then
any chain certificates) followed by the private key. Keyvault reads the
certificate with ``cryptography`` (subject, SANs, issuer, notAfter, key type) and
renews ``warn_before`` ahead of notAfter (30 days by default, like cert-manager's
``renewBefore``) or when the policy's period is up.

Renewal always makes a **new private key** (cert-manager's ``rotationPolicy:
Always``) and a CSR, has it signed — by a configured internal CA (its PEM bundle
in a secret source) or self-signed, for internal and development use — installs
the new pair as a new version, and verifies with a real TLS handshake against the
configured endpoint that the server now presents the new certificate. If it does
not, the previous version is restored. Retirement deletes the old version (and
with it the old private key) from the source.

Config (:attr:`TLSCertificateExecutor.schema`): ``common_name``, ``sans`` (DNS names / IP
addresses), ``endpoint`` (``host:port`` to verify, listed in ``HMD_OUTBOUND_ALLOWLIST``),
``server_name`` (SNI, default the common name), ``issuer``: ``self_signed`` (default) or
``internal_ca`` with ``ca_ref`` (``{"source": …, "path": …}``), ``key_type``: ``ec``
(P-256, default) or ``rsa`` (3072 bits), ``validity_days`` (90), ``verify_attempts`` (10,
0.3 s apart, for servers that reload their certificate on a timer).

An **emergency** run (key compromise) retires the old certificate at once and, before
its key is deleted, revokes it: with an ``internal_ca`` issuer and ``crl_ref``, Keyvault
adds the old serial (reason keyCompromise) to the CA's CRL kept there, signed by the CA
key; without ``crl_ref`` the run waits for a person to revoke it at the CA (manual step
``ca.revoke``, serial and fingerprint shown). A self-signed certificate has no CA: it is
deleted with its key, and pinning clients must drop it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyvault.secrets.base import SecretNotFound
from rotation.executors import outbound
from rotation.executors.base import (
    ConfigFieldError,
    Context,
    Executor,
    ExecutorError,
    VerificationFailed,
    WaitingForPerson,
    source_named,
)
from rotation.executors import schema as checks
from rotation.executors.schema import CHOICE, INTEGER, REFERENCE, TEXT, TEXT_LIST, ConfigSchema, Field

_KEY_BLOCK = re.compile(r"-----BEGIN ([A-Z ]*PRIVATE KEY)-----.+?-----END \1-----", re.S)
HANDSHAKE_TIMEOUT = 5.0


class PemBundle:
    """Certificates and a private key parsed from PEM text (the key is never shown)."""

    def __init__(self, text: str):
        try:
            self.certificates = x509.load_pem_x509_certificates(text.encode())
        except ValueError:
            raise ExecutorError("the stored value holds no PEM certificate") from None
        match = _KEY_BLOCK.search(text)
        self.key = None
        if match:
            try:
                self.key = serialization.load_pem_private_key(match.group(0).encode(), password=None)
            except (ValueError, TypeError):
                raise ExecutorError("the stored private key cannot be read (encrypted or damaged)") from None

    @property
    def certificate(self) -> x509.Certificate:
        return self.certificates[0]

    def key_matches(self) -> bool:
        if self.key is None:
            return False
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        return (self.key.public_key().public_bytes(serialization.Encoding.DER, public)
                == self.certificate.public_key().public_bytes(serialization.Encoding.DER, public))


def certificate_facts(cert: x509.Certificate) -> dict:
    """Non-secret facts about a certificate, for the console and the audit trail."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in sans]
    except x509.ExtensionNotFound:
        names = []
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key_type = f"RSA {key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key_type = f"EC {key.curve.name}"
    else:
        key_type = type(key).__name__
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": names,
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "key_type": key_type,
        "fingerprint": "sha256:" + cert.fingerprint(hashes.SHA256()).hex(),
        "expires_at": cert.not_valid_after_utc,
    }


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _general_names(names: list[str]) -> list[x509.GeneralName]:
    result = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def issue(*, common_name: str, sans: list[str], key_type: str = "ec", days: int = 90,
          ca: PemBundle | None = None, now: datetime | None = None):
    """A new private key, its CSR, and a certificate signed by ``ca`` (or self-signed). Returns (key, csr, cert)."""
    now = now or datetime.now(UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072) if key_type == "rsa" else ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    names = _general_names(sans or [common_name])
    csr = (x509.CertificateSigningRequestBuilder().subject_name(subject)
           .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(key, hashes.SHA256()))
    issuer_name, signing_key = (ca.certificate.subject, ca.key) if ca else (subject, key)
    builder = (
        x509.CertificateBuilder().subject_name(csr.subject).issuer_name(issuer_name).public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()), critical=False)
    return key, csr, builder.sign(signing_key, hashes.SHA256())


#: How long a CRL Keyvault publishes is valid (clients refetch it before then).
CRL_VALIDITY = timedelta(days=7)


def revoked_crl(ca: PemBundle, source, path: str, *, serial: int, now: datetime) -> tuple[str, int]:
    """The CA's CRL at ``source:path`` with ``serial`` added (keyCompromise), signed by ``ca``; (PEM, entries)."""
    entries: list[x509.RevokedCertificate] = []
    try:
        existing = x509.load_pem_x509_crl(source.read(path).value.encode())
    except SecretNotFound:
        existing = None
    except ValueError:
        raise ExecutorError(f"crl_ref {path}: the stored value is not a PEM CRL") from None
    if existing is not None:
        if existing.issuer != ca.certificate.subject or not existing.is_signature_valid(ca.certificate.public_key()):
            raise ExecutorError(f"crl_ref {path}: the stored CRL is not signed by this CA")
        entries = list(existing)
    if all(entry.serial_number != serial for entry in entries):
        entries.append(x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
                       .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False).build())
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.certificate.subject)
               .last_update(now).next_update(now + CRL_VALIDITY))
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM).decode(), len(entries)


def peer_certificate(host: str, port: int, *, server_name: str, trust_pem: str | None) -> x509.Certificate:
    """Handshake with ``host:port`` and return the certificate it presents (verified against ``trust_pem`` if given)."""
    if trust_pem:
        context = ssl.create_default_context(cadata=trust_pem)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # identity is checked by fingerprint below
    with socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def _crl_needs_the_internal_ca(options: dict) -> None:
    if "crl_ref" in options and options["issuer"] != "internal_ca":
        raise ConfigFieldError("crl_ref", "only with issuer internal_ca (Keyvault signs the CRL with that CA's key)")
    if "crl_ref" in options and options["crl_ref"] == options.get("ca_ref"):
        raise ConfigFieldError("crl_ref", "must not be ca_ref: the CRL would overwrite the CA's bundle")


class TLSCertificateExecutor(Executor):
    rotation_period = timedelta(days=60)
    schema = ConfigSchema((
        Field("common_name", TEXT, "the certificate's subject CN (a DNS name, `*.` allowed)", required=True,
              check=checks.dns_name_or_wildcard, form="DNS name"),
        Field("sans", TEXT_LIST, "subjectAltNames (default: the common name)", check=checks.dns_name_or_wildcard,
              items=(0, 100), unique=True, form="DNS names / IPs"),
        Field("endpoint", TEXT, "where the new certificate is checked by a TLS handshake; in "
              "HMD_OUTBOUND_ALLOWLIST (none: key and certificate are only matched)", check=checks.host_port,
              form="host:port"),
        Field("server_name", TEXT, "SNI name sent in the handshake (default: the common name)", check=checks.dns_name,
              form="DNS name"),
        Field("issuer", CHOICE, "who signs: a self-signed certificate (internal/dev) or the CA in ca_ref",
              default="self_signed", choices=("self_signed", "internal_ca")),
        Field("ca_ref", REFERENCE, "secret source and path of the CA's PEM bundle (certificate + key)",
              required_if=("issuer", "internal_ca")),
        Field("crl_ref", REFERENCE, "secret source and path where Keyvault publishes the internal CA's CRL; an "
              "emergency run adds the old serial (keyCompromise). None: a person revokes at the CA"),
        Field("key_type", CHOICE, "new private key: EC P-256 or RSA 3072", default="ec", choices=("ec", "rsa")),
        Field("validity_days", INTEGER, "days the new certificate is valid", default=90, minimum=1, maximum=825),
        Field("verify_attempts", INTEGER, "handshakes tried, 0.3 s apart, while the server reloads", default=10,
              minimum=1, maximum=100),
    ), rules=(_crl_needs_the_internal_ca,))

    def validate_config(self, config: dict) -> dict:
        options = super().validate_config(config)
        if options.get("endpoint"):
            host, port = self._endpoint(options)
            outbound.require("tls", host, port, what="endpoint")
        return options

    @staticmethod
    def _endpoint(options: dict) -> tuple[str, int]:
        host, _, port = options["endpoint"].rpartition(":")
        return host.strip("[]"), int(port)

    def inspect(self, value: str) -> dict:
        bundle = PemBundle(value)
        facts = certificate_facts(bundle.certificate)
        facts["key_matches"] = bundle.key_matches() if bundle.key is not None else None
        return facts

    def _ca(self, ctx: Context) -> PemBundle | None:
        if ctx.options["issuer"] != "internal_ca":
            return None
        ref = ctx.config("ca_ref")
        ca = PemBundle(source_named(ref["source"]).read(ref["path"]).value)
        if ca.key is None or not ca.key_matches():
            raise ExecutorError("the internal CA bundle needs the CA certificate and its private key")
        return ca

    def _revoke(self, ctx: Context) -> None:
        """Emergency: revoke the old certificate at its CA before its key is deleted (idempotent).

        With ``crl_ref`` Keyvault is the internal CA's CRL publisher: it adds the old serial
        (reason keyCompromise) to the CRL there, signed with the CA key, keeping the entries
        already listed. Otherwise a person revokes it at the CA (manual step ``ca.revoke``).
        :raises WaitingForPerson: no CRL to publish; the serial and fingerprint are in the message.
        """
        if ctx.step_done("ca.revoke"):
            return
        serial, fp = ctx.state.get("previous_serial", "?"), ctx.state.get("previous_fingerprint", "?")
        ca = self._ca(ctx)
        if ca is None:
            ctx.tick("ca.revoke", f"self-signed: no CA to revoke at; serial {serial} ({fp}) is deleted with its key "
                                  "below — remove it from every trust store that pinned it")
            return
        ref = ctx.options.get("crl_ref")
        if ref is None:
            raise WaitingForPerson("ca.revoke", f"revoke the old certificate at the CA (serial {serial}, {fp}, reason "
                                                "keyCompromise), then tick 'ca.revoke'")
        source = source_named(ref["source"])
        crl, count = revoked_crl(ca, source, ref["path"], serial=int(serial, 16), now=ctx.now)
        written = source.write(ref["path"], crl)
        ctx.tick("ca.revoke", f"serial {serial} ({fp}) added to the CRL at {ref['source']}:{ref['path']} "
                              f"(keyCompromise; version {written.version}, {count} revoked certificate(s)); "
                              "publish it where clients fetch it")

    def precheck(self, ctx: Context) -> None:
        current = ctx.read()
        facts = certificate_facts(PemBundle(current.value).certificate)
        ctx.state.update(previous_version=current.version, previous_fingerprint=facts["fingerprint"],
                         previous_serial=facts["serial"])
        ctx.tick("precheck.source", f"version {current.version}: {facts['subject']}, expires {facts['not_after']}")
        ca = self._ca(ctx)
        if ca is not None:
            not_after = ca.certificate.not_valid_after_utc
            if not_after <= ctx.now:
                raise ExecutorError(f"the internal CA expired on {not_after:%Y-%m-%d}")
            ctx.tick("precheck.issuer", f"internal CA {ca.certificate.subject.rfc4514_string()} valid until {not_after:%Y-%m-%d}")
        else:
            ctx.tick("precheck.issuer", "self-signed (internal / development use)")

    def rotate(self, ctx: Context) -> None:
        if ctx.state.get("new_version"):
            return
        cfg = ctx.options
        ca = self._ca(ctx)
        key, csr, cert = issue(common_name=cfg["common_name"], sans=list(cfg.get("sans") or []),
                               key_type=cfg["key_type"], days=cfg["validity_days"], ca=ca, now=ctx.now)
        facts = certificate_facts(cert)
        ctx.tick("rotate.key", f"new {facts['key_type']} private key")
        ctx.state["csr"] = csr.public_bytes(serialization.Encoding.PEM).decode()
        ctx.tick("rotate.csr", f"CSR for {facts['subject']} with SANs {', '.join(facts['sans'])}")
        ctx.tick("rotate.issue", f"issued by {facts['issuer']}, serial {facts['serial']}, valid until {facts['not_after']}")
        chain = _pem(ca.certificate) if ca else ""
        written = ctx.write(_pem(cert) + chain + _key_pem(key))
        facts["expires_at"] = facts["expires_at"].isoformat()
        ctx.state.update(new_version=written.version, new_fingerprint=facts["fingerprint"], facts=facts)
        ctx.tick("rotate.install", f"version {written.version} holds the new pair ({facts['fingerprint']})")

    def verify(self, ctx: Context) -> None:
        bundle = PemBundle(ctx.read().value)
        if not bundle.key_matches():
            raise VerificationFailed("the installed private key does not match the certificate")
        if certificate_facts(bundle.certificate)["fingerprint"] != ctx.state["new_fingerprint"]:
            raise VerificationFailed("the source does not hold the new certificate")
        if not ctx.options.get("endpoint"):
            ctx.tick("verify.handshake", "no endpoint configured: checked that key and certificate match only")
            return
        host, port = self._endpoint(ctx.options)
        outbound.require("tls", host, port, what="endpoint", ctx=ctx, step="verify.handshake")
        server_name = ctx.options.get("server_name") or ctx.options["common_name"]
        trust = _pem(bundle.certificates[-1]) if len(bundle.certificates) > 1 else _pem(bundle.certificate)
        attempts = ctx.options["verify_attempts"]
        seen = None
        for attempt in range(max(1, attempts)):
            try:
                seen = peer_certificate(host, port, server_name=server_name, trust_pem=trust)
            except (OSError, ssl.SSLError) as exc:
                seen = None
                error = f"{type(exc).__name__}: {exc}"
            else:
                if "sha256:" + seen.fingerprint(hashes.SHA256()).hex() == ctx.state["new_fingerprint"]:
                    ctx.tick("verify.handshake", f"{host}:{port} presents the new certificate (verified chain and "
                                                 f"name {server_name}) after {attempt + 1} handshake(s)")
                    return
                error = "the endpoint still presents another certificate"
            time.sleep(0.3)
        raise VerificationFailed(f"TLS handshake with {host}:{port}: {error}")

    def retire(self, ctx: Context) -> None:
        if ctx.run.kind == "emergency":
            self._revoke(ctx)
        previous = ctx.state.get("previous_version")
        if previous and ctx.source().writable:
            ctx.source().delete_version(ctx.secret.path, previous)
            ctx.tick("retire", f"version {previous} (old certificate and private key) deleted from {ctx.secret.source}")
        else:
            ctx.tick("retire", "previous version kept (the source cannot delete versions)")
