"""Configuration from HMD_* variables and HMD_*_FILE files; no silent secrets in production."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRINT_SETTINGS = (
    "import json, django; django.setup(); from django.conf import settings as s;"
    "print(json.dumps({'debug': s.DEBUG, 'secret': s.SECRET_KEY, 'fallbacks': s.SECRET_KEY_FALLBACKS,"
    "'hosts': s.ALLOWED_HOSTS, 'db': s.DATABASES['default']['ENGINE'], 'broker': s.CELERY_BROKER_URL,"
    "'kms': s.KMS['default'], 'providers': sorted(s.KMS['providers'])}))"
)


def load_settings(tmp_path, **variables):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update({"DJANGO_SETTINGS_MODULE": "keyvault.settings", "HMD_DATA_DIR": str(tmp_path / "data"), **variables})
    result = subprocess.run([sys.executable, "-c", PRINT_SETTINGS], capture_output=True, text=True, cwd=ROOT, env=env)
    return result


def test_development_defaults_generate_secrets_once_with_mode_0600(tmp_path):
    first = json.loads(load_settings(tmp_path).stdout)
    second = json.loads(load_settings(tmp_path).stdout)

    assert first["debug"] is True
    assert first["secret"] == second["secret"] and len(first["secret"]) > 40
    assert first["db"] == "django.db.backends.sqlite3" and first["broker"].startswith("filesystem://")
    assert first["kms"] == "local"
    for name in ("secret_key", "local_kms_master_key", "audit_hmac_key", "audit_signing_key"):
        assert (tmp_path / "data" / name).stat().st_mode & 0o777 == 0o600


def test_production_without_secret_key_is_a_clear_startup_error(tmp_path):
    result = load_settings(tmp_path, HMD_DEBUG="false")

    assert result.returncode != 0
    assert "HMD_SECRET_KEY (or HMD_SECRET_KEY_FILE, or HMD_SECRET_KEY_REF) must be set when HMD_DEBUG=false" in result.stderr
    assert not (tmp_path / "data" / "secret_key").exists()


def test_production_needs_every_secret(tmp_path):
    result = load_settings(tmp_path, HMD_DEBUG="false", HMD_SECRET_KEY="s" * 50)

    assert result.returncode != 0
    assert "HMD_LOCAL_KMS_MASTER_KEY" in result.stderr


def test_secrets_from_files_drop_one_trailing_newline(tmp_path):
    (tmp_path / "key").write_text("from-a-file\n")
    result = load_settings(
        tmp_path,
        HMD_SECRET_KEY_FILE=str(tmp_path / "key"),
        HMD_SECRET_KEY_FALLBACKS="old-one,older-one",
        HMD_ALLOWED_HOSTS="kv.example.com",
    )

    loaded = json.loads(result.stdout)
    assert loaded["secret"] == "from-a-file"
    assert loaded["fallbacks"] == ["old-one", "older-one"]
    assert loaded["hosts"] == ["kv.example.com"]


def test_database_url_and_provider_selection(tmp_path):
    result = load_settings(
        tmp_path,
        HMD_DATABASE_URL="postgres://u@127.0.0.1:5432/kv",
        HMD_KMS_PROVIDER="vault",
        HMD_VAULT_ADDR="http://127.0.0.1:8200",
    )

    loaded = json.loads(result.stdout)
    assert loaded["db"] == "django.db.backends.postgresql"
    assert loaded["kms"] == "vault"
    assert "vault" in loaded["providers"]
