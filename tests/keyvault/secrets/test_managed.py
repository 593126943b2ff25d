"""Managed-secret sources never reach Keyvault's own secrets (issue 12, finding 3), through any reference form."""

from __future__ import annotations

import os

import pytest

from keyvault.secrets.managed import OwnSecretRefused, check_file, check_location, own_secrets


def own(environ, options=None):
    return own_secrets(environ, lambda: options or {})


@pytest.mark.parametrize("reference,scheme,path,options", [
    ("vault:secret/keyvault#audit_signing_key", "vault", "keyvault#password", {"mount": "secret"}),
    ("vault:secret/keyvault", "vault", "/keyvault/", {"mount": "secret"}),
    ("aws:prod/keyvault#signing", "aws", "prod/keyvault", {}),
    ("aws:prod/keyvault", "aws", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/keyvault-AbCdEf#x", {}),
    # a name ending in '-' and six letters looks like an ARN's random suffix: AWS resolves the partial ARN to it
    ("aws:prod/kv-signer", "aws", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/kv-signer", {}),
    ("aws:arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/kv-signer", "aws", "prod/kv-signer", {}),
    # the project by its number instead of its id: the same secret to Secret Manager
    ("gcp:keyvault-signing", "gcp", "projects/123456789012/secrets/keyvault-signing", {"project": "acme"}),
    ("gcp:projects/123456789012/secrets/keyvault-signing", "gcp", "keyvault-signing", {"project": "acme"}),
    ("gcp:keyvault-signing", "gcp", "projects/acme/secrets/keyvault-signing", {"project": "acme"}),
    ("gcp:projects/acme/secrets/keyvault-signing", "gcp", "keyvault-signing#field", {"project": "acme"}),
    ("k8s:keyvault/keyvault-secrets#signing", "k8s", "keyvault-secrets#other-key", {"namespace": "keyvault"}),
    ("k8s:keyvault-secrets#signing", "k8s", "keyvault/keyvault-secrets", {"namespace": "keyvault"}),
])
def test_a_managed_path_naming_the_target_of_an_own_reference_is_refused(reference, scheme, path, options):
    # given: Keyvault's signing key read through a reference
    environ = {"HMD_AUDIT_SIGNING_KEY_REF": reference}

    # when / then: the same stored secret, under any field, key or spelling, is refused, naming the variable
    with pytest.raises(OwnSecretRefused, match="HMD_AUDIT_SIGNING_KEY_REF"):
        check_location(scheme, path, options, own(environ, {scheme: options}))


@pytest.mark.parametrize("scheme,path,options", [
    ("vault", "payments/db#password", {"mount": "secret"}),
    ("vault", "keyvault#password", {"mount": "kv2"}),
    ("aws", "prod/payments", {}),
    ("gcp", "projects/other/secrets/keyvault-signing", {"project": "acme"}),
    ("k8s", "payments/keyvault-secrets#signing", {"namespace": "keyvault"}),
])
def test_other_secrets_of_the_same_sources_stay_usable(scheme, path, options):
    environ = {"HMD_AUDIT_SIGNING_KEY_REF": {"vault": "vault:secret/keyvault", "aws": "aws:prod/keyvault",
                                             "gcp": "gcp:keyvault-signing", "k8s": "k8s:keyvault-secrets#x"}[scheme]}
    check_location(scheme, path, options, own(environ, {scheme: {**options, "mount": "secret", "project": "acme",
                                                                 "namespace": "keyvault"}}))


def test_files_named_by_settings_and_the_data_dir_are_refused_but_the_source_folder_is_not(tmp_path):
    # given: a data dir with the file source's folder inside (the default), and a key file elsewhere
    data_dir, key_file = tmp_path / "var", tmp_path / "run" / "secret_key"
    (data_dir / "secrets").mkdir(parents=True)
    key_file.parent.mkdir()
    key_file.write_text("k")
    (data_dir / "secrets" / "ok").write_text("v")
    (data_dir / "secrets" / "link").symlink_to(key_file)
    (data_dir / "secrets" / "up").symlink_to(data_dir / "keyvault.sqlite3")
    environ = {"HMD_DATA_DIR": str(data_dir), "HMD_SECRET_KEY_FILE": str(key_file),
               "HMD_DATABASE_URL": f"sqlite:///{data_dir / 'keyvault.sqlite3'}"}
    found, root = own(environ), os.path.realpath(data_dir / "secrets")

    check_file(data_dir / "secrets" / "ok", found, root=root)
    with pytest.raises(OwnSecretRefused, match="HMD_SECRET_KEY_FILE"):
        check_file(data_dir / "secrets" / "link", found, root=None)
    with pytest.raises(OwnSecretRefused, match="outside the file source"):
        check_file(data_dir / "secrets" / "link", found, root=root)
    with pytest.raises(OwnSecretRefused, match="HMD_DA"):
        check_file(data_dir / "secrets" / "up", found, root=None)
    with pytest.raises(OwnSecretRefused, match="HMD_DATA_DIR"):
        check_file(data_dir / "secrets" / ".." / "audit_signing_key", found, root=tmp_path)


def test_the_cookie_keyring_can_be_allowed_and_nothing_else(tmp_path):
    keyring = tmp_path / "keyring"
    keyring.write_text("{}")
    environ = {"HMD_SECRET_KEY_KEYRING_FILE": str(keyring), "HMD_AUDIT_HMAC_KEY_FILE": str(tmp_path / "hmac")}
    found = own(environ).without(["HMD_SECRET_KEY_KEYRING"])
    check_file(keyring, found)
    with pytest.raises(OwnSecretRefused):
        check_file(tmp_path / "hmac", found)
