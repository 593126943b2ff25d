"""keyvault.config.get_secret: HMD_X_REF references, HMD_X, HMD_X_FILE; settings resolved end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keyvault.config import get_secret, parse_secret_ref
from keyvault.secrets import (
    InvalidSecretReference,
    SecretNotFound,
    SecretSourceConfigurationError,
    SecretSourceUnavailable,
    get_source,
)
from keyvault.secrets.env import EnvSource
from keyvault.secrets.files import FileSource
from tests.keyvault.secrets.conftest import unique
from tests.servers.moto import free_port

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def clean_env(monkeypatch):
    """No HMD_TEST_SECRET* variables from outside."""
    for name in list(os.environ):
        if name.startswith("HMD_TEST_SECRET"):
            monkeypatch.delenv(name)
    return monkeypatch


# -- precedence and errors -------------------------------------------------


def test_file_then_plain_variable_then_default(clean_env, tmp_path):
    assert get_secret("HMD_TEST_SECRET", default="fallback") == "fallback"

    clean_env.setenv("HMD_TEST_SECRET", "from-env")
    assert get_secret("TEST_SECRET") == "from-env"

    # django-environ's FileAwareEnv rule, kept: the _FILE variant wins over the plain one.
    (tmp_path / "s").write_text("from-file\n")
    clean_env.setenv("HMD_TEST_SECRET_FILE", str(tmp_path / "s"))
    assert get_secret("HMD_TEST_SECRET") == "from-file"


def test_reference_wins_over_plain_variable(clean_env, tmp_path):
    (tmp_path / "mounted").write_text("from-reference\n")
    clean_env.setenv("HMD_TEST_SECRET", "plain")
    clean_env.setenv("HMD_TEST_SECRET_REF", f"file:{tmp_path / 'mounted'}")

    assert get_secret("HMD_TEST_SECRET") == "from-reference"


def test_file_reference_is_reread_after_rotation(clean_env, tmp_path):
    secret = tmp_path / "rotating"
    secret.write_text("one")
    clean_env.setenv("HMD_TEST_SECRET_REF", f"file:{secret}")
    assert get_secret("HMD_TEST_SECRET") == "one"

    (tmp_path / "next").write_text("two")
    os.replace(tmp_path / "next", secret)

    assert get_secret("HMD_TEST_SECRET") == "two"


def test_missing_secret_names_every_variable(clean_env):
    with pytest.raises(SecretNotFound) as error:
        get_secret("HMD_TEST_SECRET")

    assert "HMD_TEST_SECRET_REF" in str(error.value) and "HMD_TEST_SECRET_FILE" in str(error.value)


def test_failed_reference_names_the_variable_not_the_value(clean_env, tmp_path):
    clean_env.setenv("HMD_TEST_SECRET_REF", f"file:{tmp_path / 'absent'}")

    with pytest.raises(SecretNotFound, match="HMD_TEST_SECRET_REF"):
        get_secret("HMD_TEST_SECRET")


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("vault:secret/keyvault#secret_key", ("vault", "keyvault#secret_key", {"mount": "secret"})),
        ("vault:kv/team/app", ("vault", "team/app", {"mount": "kv"})),
        (
            "aws:arn:aws:secretsmanager:eu-west-1:123456789012:secret:db-AbCdEf#password",
            ("aws", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:db-AbCdEf#password", {}),
        ),
        ("gcp:projects/p/secrets/s", ("gcp", "projects/p/secrets/s", {})),
        ("k8s:prod/db#password", ("k8s", "prod/db#password", {})),
        ("kubernetes:db#password", ("k8s", "db#password", {})),
        ("file:/run/secrets/key", ("file", "/run/secrets/key", {})),
        ("env:OTHER", ("env", "OTHER", {})),
    ],
)
def test_reference_syntax(reference, expected):
    assert parse_secret_ref(reference) == expected


@pytest.mark.parametrize(
    "reference", ["", "no-scheme", "ftp:host/x", "vault:nomount", "vault:secret/", "vault:/x", "file:relative/path", "aws:", "k8s:#key"]
)
def test_bad_references_are_typed_errors(reference):
    with pytest.raises(InvalidSecretReference):
        parse_secret_ref(reference)


# -- references to each remote source, with the source's own HMD_* settings ------------


def test_vault_reference(clean_env, openbao_server):
    path = unique("kvref/")
    openbao_server.request("POST", f"secret/data/{path}", {"data": {"secret_key": "from-vault"}})
    clean_env.setenv("HMD_VAULT_ADDR", openbao_server.addr)
    clean_env.setenv("HMD_VAULT_TOKEN", openbao_server.root_token)
    clean_env.setenv("HMD_TEST_SECRET_REF", f"vault:secret/{path}#secret_key")

    assert get_secret("HMD_TEST_SECRET") == "from-vault"


def test_aws_reference(clean_env, aws_secret_source, moto_server):
    path = unique("kvref/")
    aws_secret_source.write(path + "#password", "from-aws")
    clean_env.setenv("HMD_AWS_REGION", moto_server.region)
    clean_env.setenv("HMD_AWS_SECRETSMANAGER_ENDPOINT_URL", moto_server.endpoint_url)
    clean_env.setenv("HMD_TEST_SECRET_REF", f"aws:{path}#password")

    assert get_secret("HMD_TEST_SECRET") == "from-aws"


def test_gcp_reference(clean_env, gcp_secret_source, secretmanager_emulator):
    secret_id = unique("kvref-")
    gcp_secret_source.write(secret_id, "from-gcp")
    clean_env.setenv("HMD_GCP_PROJECT", "other-project")
    clean_env.setenv("HMD_GCP_SECRETMANAGER_ENDPOINT", secretmanager_emulator.url)
    clean_env.setenv("HMD_GCP_ANONYMOUS_CREDENTIALS", "true")
    clean_env.setenv("HMD_TEST_SECRET_REF", f"gcp:projects/kv-test/secrets/{secret_id}")

    assert get_secret("HMD_TEST_SECRET") == "from-gcp"


def test_k8s_reference(clean_env, k8s_api, k8s_token_file):
    name = unique("ref-")
    k8s_api.put_secret("other", name, {"password": "from-k8s"})
    clean_env.setenv("HMD_K8S_API_URL", k8s_api.url)
    clean_env.setenv("HMD_K8S_TOKEN_PATH", str(k8s_token_file))
    clean_env.setenv("HMD_TEST_SECRET_REF", f"k8s:other/{name}#password")

    assert get_secret("HMD_TEST_SECRET") == "from-k8s"


def test_unreachable_reference_is_unavailable(clean_env):
    clean_env.setenv("HMD_VAULT_ADDR", f"http://127.0.0.1:{free_port()}")
    clean_env.setenv("HMD_VAULT_TOKEN", "t")
    clean_env.setenv("HMD_TEST_SECRET_REF", "vault:secret/x#y")

    with pytest.raises(SecretSourceUnavailable, match="HMD_TEST_SECRET_REF"):
        get_secret("HMD_TEST_SECRET")


# -- missing SDKs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "module, build, package",
    [
        ("hvac", lambda: __import__("keyvault.secrets.vault_kv").secrets.vault_kv.VaultKVSource.from_config(
            {"addr": "http://127.0.0.1:1", "token": "t"}), "hvac"),
        ("boto3", lambda: __import__("keyvault.secrets.aws_sm").secrets.aws_sm.AWSSecretsManagerSource(region="x"), "boto3"),
        ("google.cloud.secretmanager_v1", lambda: __import__("keyvault.secrets.gcp_sm").secrets.gcp_sm.GCPSecretManagerSource(
            "p", endpoint="http://127.0.0.1:1", anonymous_credentials=True), "google-cloud-secret-manager"),
    ],
)
def test_missing_sdk_is_a_configuration_error_naming_the_package(monkeypatch, module, build, package):
    # A None entry in sys.modules makes "import <module>" fail as if it were not installed.
    monkeypatch.setitem(sys.modules, module, None)
    if module == "hvac":
        monkeypatch.setitem(sys.modules, "hvac.exceptions", None)

    with pytest.raises(SecretSourceConfigurationError, match=package):
        build()


# -- the registry under Django settings --------------------------------------------------


def test_registry_builds_from_settings_and_resets_on_change(settings, tmp_path):
    settings.SECRET_SOURCES = {"default": "file", "sources": {"file": {"directory": str(tmp_path / "a")}, "env": {}}}
    first = get_source()
    assert isinstance(first, FileSource) and first is get_source("file")
    assert isinstance(get_source("env"), EnvSource)

    settings.SECRET_SOURCES = {"default": "file", "sources": {"file": {"directory": str(tmp_path / "b")}}}

    assert get_source().root == tmp_path / "b"
    with pytest.raises(SecretSourceConfigurationError, match="not configured"):
        get_source("vault")


# -- Django settings, end to end in a subprocess ------------------------------------------

PRINT = (
    "import json, django; django.setup(); from django.conf import settings as s;"
    "print(json.dumps({'secret': s.SECRET_KEY, 'db_password': s.DATABASES['default'].get('PASSWORD'),"
    "'master': s.LOCAL_KMS_MASTER_KEY, 'sources': sorted(s.SECRET_SOURCES['sources'])}))"
)


def _settings(tmp_path, **variables) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update({"DJANGO_SETTINGS_MODULE": "keyvault.settings", "HMD_DATA_DIR": str(tmp_path / "data"), **variables})
    return subprocess.run([sys.executable, "-c", PRINT], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def test_settings_take_secret_key_from_vault_and_db_password_from_a_file(tmp_path, openbao_server):
    path = unique("keyvault-")
    django_key = "k" * 20 + unique()
    openbao_server.request("POST", f"secret/data/{path}", {"data": {"secret_key": django_key}})
    (tmp_path / "db-password").write_text("pg-pass\n")

    result = _settings(
        tmp_path,
        HMD_VAULT_ADDR=openbao_server.addr,
        HMD_VAULT_TOKEN=openbao_server.root_token,
        HMD_SECRET_KEY_REF=f"vault:secret/{path}#secret_key",
        HMD_DATABASE_URL="postgres://kv:url-pass@127.0.0.1:5432/kv",
        HMD_DATABASE_PASSWORD_REF=f"file:{tmp_path / 'db-password'}",
    )

    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["secret"] == django_key
    assert loaded["db_password"] == "pg-pass"
    assert "vault" in loaded["sources"]
    assert not (tmp_path / "data" / "secret_key").exists()  # nothing generated


def test_production_settings_with_master_key_from_a_reference(tmp_path, openbao_server):
    from keyvault.kms.local import generate_master_key

    path = unique("keyvault-")
    master = generate_master_key()
    openbao_server.request("POST", f"secret/data/{path}", {"data": {"master": master, "django": "d" * 50}})
    common = {"HMD_VAULT_ADDR": openbao_server.addr, "HMD_VAULT_TOKEN": openbao_server.root_token}

    result = _settings(
        tmp_path,
        HMD_DEBUG="false",
        HMD_ALLOW_SQLITE_IN_PRODUCTION="true",  # this test is about the references, not the database
        HMD_SECRET_KEY_REF=f"vault:secret/{path}#django",
        HMD_LOCAL_KMS_MASTER_KEY_REF=f"vault:secret/{path}#master",
        HMD_AUDIT_HMAC_KEY="h" * 40,
        HMD_AUDIT_SIGNING_KEY=__import__("keyvault.settings", fromlist=["_new_ed25519_key"])._new_ed25519_key(),
        **common,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["master"] == master


def test_broken_reference_stops_startup_with_a_clear_error(tmp_path, openbao_server):
    path = unique("keyvault-")
    openbao_server.request("POST", f"secret/data/{path}", {"data": {"other": "value-never-shown"}})

    result = _settings(
        tmp_path,
        HMD_VAULT_ADDR=openbao_server.addr,
        HMD_VAULT_TOKEN=openbao_server.root_token,
        HMD_SECRET_KEY_REF=f"vault:secret/{path}#secret_key",
    )

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and "HMD_SECRET_KEY_REF" in result.stderr
    assert "value-never-shown" not in result.stderr
