"""Issue 12, finding 3: a Key administrator cannot make the worker send Keyvault's own secrets anywhere.

The attack: register an OAuth client secret whose source and path name Keyvault's
audit signing key (directly, through ``HMD_X_FILE``, through ``HMD_X_REF``, or as a
file in ``HMD_DATA_DIR``) and whose token endpoint is the attacker's, then rotate
it: the precheck's token request would carry the key as the client secret. Each
test plays it end to end — the console as an administrator, the engine as the
worker — against a local HTTP server standing in for the attacker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.test import override_settings

from keyvault.models import AuditEvent, ManagedSecret
from rotation import services
from tests.keyvault import make_role_user
from tests.rotation.executors.test_oauth import TokenEndpoint

pytestmark = pytest.mark.django_db


@pytest.fixture
def attacker():
    """The attacker's token endpoint on 127.0.0.1: it keeps every client secret it is sent."""
    endpoint = TokenEndpoint("keyvault", valid=set())
    yield endpoint
    endpoint.close()


@pytest.fixture
def signing_key():
    return django_settings.AUDIT_SIGNING_KEY


@pytest.fixture
def administrator(client):
    client.force_login(make_role_user("administrator"))
    return client


@pytest.fixture
def files_root(tmp_path):
    """The file secret source in a folder of its own (as HMD_SECRET_FILES_DIR would set it)."""
    root = tmp_path / "managed"
    root.mkdir()
    with override_settings(SECRET_SOURCES={"default": "env", "sources": {"env": {}, "file": {"directory": str(root)}}}):
        yield root


def attack(administrator, attacker, *, source: str, path: str, name: str = "exfil"):
    """What the administrator does: add the secret in the console, start its rotation, and let the worker run it."""
    added = administrator.post("/keyvault/managedsecret/add/", {
        "name": name, "secret_type": "oauth_client_secret", "source": source, "path": path, "owner": "", "description": "",
        "config": f'{{"token_endpoint": "{attacker.url}", "client_id": "keyvault"}}'})
    secret = ManagedSecret.objects.filter(name=name).first()
    if secret is None:  # refused by the console: try one saved before the fix instead (rows are not re-validated)
        secret = ManagedSecret.objects.create(name=name, secret_type="oauth_client_secret", source=source, path=path,
                                              config={"token_endpoint": attacker.url, "client_id": "keyvault"})
    with services.inline_dispatch():
        administrator.post(f"/keyvault/managedsecret/{secret.pk}/rotate/", {"kind": "on_demand", "reason": "routine"})
    run = secret.rotation_runs.get()
    return added, services.drive(run.pk)


def assert_refused_and_audited(added, run, attacker, signing_key):
    # nothing reached the attacker, in any form
    assert signing_key not in attacker.secrets and attacker.secrets == []
    # the console said why (one line, naming the setting, never the value), and the attempt is in the chain
    assert added.status_code == 200 and "one of Keyvault&#x27;s own" in added.content.decode()
    attempt = AuditEvent.objects.get(action="secret", target_id="exfil", details__event="own_secret_refused")
    assert attempt.outcome == "denied" and attempt.actor == "user:administrator"
    assert "HMD_AUDIT_SIGNING_KEY" in attempt.details["error"] and signing_key not in str(attempt.details)
    # the worker refused too, and the refusal is in the audit chain
    assert run.state == "failed" and "OwnSecretRefused" in run.last_error and signing_key not in run.last_error
    failed = AuditEvent.objects.get(action="secret", target_id="exfil", details__event="rotation_failed")
    assert "HMD_AUDIT_SIGNING_KEY" in failed.details["error"] and signing_key not in str(failed.details)


def test_env_source_cannot_read_the_audit_signing_key(administrator, attacker, signing_key, monkeypatch):
    # given: the signing key set in the environment, as in production
    monkeypatch.setenv("HMD_AUDIT_SIGNING_KEY", signing_key)

    # when: an administrator points an OAuth secret at it and rotates it
    added, run = attack(administrator, attacker, source="env", path="AUDIT_SIGNING_KEY")

    # then
    assert_refused_and_audited(added, run, attacker, signing_key)


def test_env_source_reads_only_managed_variables(monkeypatch, files_root):
    # given: a managed variable and the signing key in the environment
    from keyvault.secrets import OwnSecretRefused, managed_source

    monkeypatch.setenv("HMD_MANAGED_PAYMENTS_API", "api-key-1")
    monkeypatch.setenv("HMD_AUDIT_SIGNING_KEY", "the-key")
    source = managed_source("env")

    # when / then: the managed one reads, a setting of Keyvault's never does
    assert source.read("payments_api").value == "api-key-1"
    with pytest.raises(OwnSecretRefused, match="HMD_AUDIT_SIGNING_KEY is one of Keyvault's own settings"):
        source.read("AUDIT_SIGNING_KEY")


@pytest.mark.parametrize("path", ["HMD_AUDIT_SIGNING_KEY", "audit-signing-key", "hmd_audit_signing_key"])
def test_no_spelling_of_a_setting_reaches_it_through_the_env_source(administrator, attacker, signing_key,
                                                                    monkeypatch, path):
    monkeypatch.setenv("HMD_AUDIT_SIGNING_KEY", signing_key)
    added, run = attack(administrator, attacker, source="env", path=path)
    assert_refused_and_audited(added, run, attacker, signing_key)


def test_env_source_cannot_read_it_through_its_file_variable(administrator, attacker, signing_key, monkeypatch,
                                                             tmp_path):
    # given: HMD_AUDIT_SIGNING_KEY_FILE, and a managed variable an operator pointed at the same file
    key_file = tmp_path / "audit_signing_key"
    key_file.write_text(signing_key + "\n")
    monkeypatch.setenv("HMD_AUDIT_SIGNING_KEY_FILE", str(key_file))
    monkeypatch.setenv("HMD_MANAGED_BILLING_FILE", str(key_file))

    # when
    added, run = attack(administrator, attacker, source="env", path="billing")

    # then
    assert_refused_and_audited(added, run, attacker, signing_key)


def test_file_source_cannot_read_a_reference_target(administrator, attacker, signing_key, monkeypatch, files_root):
    # given: HMD_AUDIT_SIGNING_KEY_REF=file:… naming a file inside the managed secrets' folder
    (files_root / "ops").mkdir()
    monkeypatch.setenv("HMD_SECRET_FILES_DIR", str(files_root))
    (files_root / "ops" / "signing").write_text(signing_key)
    monkeypatch.setenv("HMD_AUDIT_SIGNING_KEY_REF", f"file:{files_root / 'ops' / 'signing'}")

    added, run = attack(administrator, attacker, source="file", path="ops/signing")

    assert_refused_and_audited(added, run, attacker, signing_key)


def test_file_source_cannot_read_the_development_key_in_the_data_dir(administrator, attacker, signing_key,
                                                                    monkeypatch, files_root):
    # given: the generated key in HMD_DATA_DIR/audit_signing_key, and a symlink to it in the managed folder
    data_dir = Path(django_settings.DATA_DIR)
    monkeypatch.setenv("HMD_DATA_DIR", str(data_dir))
    (data_dir / "audit_signing_key").write_text(signing_key + "\n") if not (data_dir / "audit_signing_key").exists() else None
    (files_root / "innocent").symlink_to(data_dir / "audit_signing_key")

    added, run = attack(administrator, attacker, source="file", path="innocent")

    assert attacker.secrets == []
    assert added.status_code == 200 and run.state == "failed" and "OwnSecretRefused" in run.last_error


def test_file_source_rooted_at_the_data_dir_cannot_read_it_either(administrator, attacker, signing_key, monkeypatch):
    # given: HMD_SECRET_FILES_DIR set to HMD_DATA_DIR itself
    data_dir = Path(django_settings.DATA_DIR)
    monkeypatch.setenv("HMD_DATA_DIR", str(data_dir))
    key_file = data_dir / "audit_signing_key"
    if not key_file.exists():
        key_file.write_text(signing_key + "\n")
    sources = {"default": "env", "sources": {"env": {}, "file": {"directory": str(data_dir)}}}
    with override_settings(SECRET_SOURCES=sources):
        added, run = attack(administrator, attacker, source="file", path="audit_signing_key")

    assert attacker.secrets == [] and run.state == "failed" and "HMD_DATA_DIR" in run.last_error


def test_an_endpoint_outside_the_allowlist_gets_nothing_and_the_refusal_is_a_failed_step(
    administrator, attacker, files_root, settings
):
    # given: a legitimate client secret, registered while its endpoint was allowed
    (files_root / "billing").write_text("client-secret-1")
    secret = services.register_secret(name="billing", secret_type="oauth_client_secret", source="file",
                                      path="billing", config={"token_endpoint": attacker.url, "client_id": "billing"},
                                      actor=services.ENGINE)

    # when: the operator's allowlist no longer has it, and the rotation runs
    settings.OUTBOUND_ALLOWLIST = ["https://idp.example.com"]
    with services.inline_dispatch():
        run = services.start_run(secret=secret, actor=services.ENGINE, reason="routine")
    run = services.drive(run.pk)

    # then: nothing was sent, the run failed with one clear line, and the chain has the refusal
    assert attacker.secrets == []
    assert run.state == "failed" and "OutboundNotAllowed: token_endpoint http://127.0.0.1:" in run.last_error
    assert "is not in HMD_OUTBOUND_ALLOWLIST" in run.last_error.splitlines()[0]
    assert run.steps.get(key="precheck.token").status == "failed"
    refused = AuditEvent.objects.get(action="secret", target_id="billing", details__event="outbound_refused")
    assert refused.outcome == "denied" and refused.details["endpoint"].startswith("http://127.0.0.1:")
    # and registering another one there is refused up front
    with pytest.raises(Exception, match="not in HMD_OUTBOUND_ALLOWLIST"):
        services.register_secret(name="billing2", secret_type="oauth_client_secret", source="file", path="billing",
                                 config={"token_endpoint": attacker.url, "client_id": "b"}, actor=services.ENGINE)


@pytest.mark.parametrize("stored", ["{key}", "{{\"audit_signing_key\": \"{key}\", \"x\": 1}}"])
def test_a_copy_of_an_own_secret_under_a_path_keyvault_does_not_know_is_never_sent(administrator, attacker, signing_key,
                                                                                   files_root, stored):
    # given: Keyvault's signing key also reachable through a managed source under a name no HMD_* variable gives
    # (docs/ops/secrets.md's Kubernetes layout: Keyvault reads the Secret keyvault-secrets as mounted files, and its
    # service account may also get it through the k8s source); here a file in the managed folder holds it
    (files_root / "copy").write_text(stored.format(key=signing_key))

    # when: an administrator points an OAuth secret at it and rotates it
    added, run = attack(administrator, attacker, source="file", path="copy")

    # then: the value is recognised as Keyvault's own when it is read: nothing is sent, the run fails, audited
    assert attacker.secrets == [] and signing_key not in str(attacker.requests)
    assert run.state == "failed" and "OwnSecretRefused" in run.last_error and signing_key not in run.last_error
    failed = AuditEvent.objects.get(action="secret", target_id="exfil", details__event="rotation_failed")
    assert "one of Keyvault's own" in failed.details["error"] and signing_key not in str(failed.details)
