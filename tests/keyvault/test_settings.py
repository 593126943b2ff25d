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


PRINT_PREPARE_THRESHOLD = (
    "import json, django; django.setup(); from django.conf import settings as s;"
    "print(json.dumps(s.DATABASES['default']['OPTIONS'].get('prepare_threshold', 'absent')))"
)


def _prepare_threshold(tmp_path, **variables):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update({"DJANGO_SETTINGS_MODULE": "keyvault.settings", "HMD_DATA_DIR": str(tmp_path / "data"), **variables})
    return subprocess.run([sys.executable, "-c", PRINT_PREPARE_THRESHOLD], capture_output=True, text=True, cwd=ROOT,
                          env=env)


def test_postgresql_statements_are_prepared_after_five_runs_unless_configured_otherwise(tmp_path):
    postgres = {"HMD_DATABASE_URL": "postgres://u@127.0.0.1:5432/kv"}
    assert json.loads(_prepare_threshold(tmp_path, **postgres).stdout) == 5
    assert json.loads(_prepare_threshold(tmp_path, **postgres, HMD_DATABASE_PREPARE_THRESHOLD="0").stdout) == 0
    assert json.loads(_prepare_threshold(tmp_path, **postgres, HMD_DATABASE_PREPARE_THRESHOLD="none").stdout) is None
    assert json.loads(_prepare_threshold(tmp_path).stdout) == "absent"  # SQLite has no such option
    refused = _prepare_threshold(tmp_path, **postgres, HMD_DATABASE_PREPARE_THRESHOLD="-1")
    assert refused.returncode != 0 and "HMD_DATABASE_PREPARE_THRESHOLD: expected a count or none" in refused.stderr


# Runs as web, worker and beat would: writes the database (WAL on), the keyring, a broker
# message and the beat schedule, then lists the mode of everything in HMD_DATA_DIR while
# the database connection (and so its -wal and -shm files) is still open.
WRITE_STATE_AND_LIST_MODES = """
import json, os, shelve, stat, django
django.setup()
from django.conf import settings
from django.db import connection
from keyvault.ops.bootstrap import bootstrap
from keyvault.celery import app
bootstrap(admin_password="correct horse battery staple")
app.send_task("keyvault.no_such_task")
shelve.open(settings.CELERY_BEAT_SCHEDULE_FILENAME).close()
with connection.cursor() as cursor:
    cursor.execute("SELECT COUNT(*) FROM auth_user")
modes = {}
for folder, dirs, files in os.walk(settings.DATA_DIR):
    for name in [".", *dirs, *files]:
        path = os.path.normpath(os.path.join(folder, name))
        modes[os.path.relpath(path, settings.DATA_DIR)] = stat.S_IMODE(os.lstat(path).st_mode)
print(json.dumps(modes))
"""


def _as_a_shell_would(umask: int = 0o022):
    """Start the child with a usual login umask, not this test process's own."""
    return lambda: os.umask(umask)


def test_data_dir_is_0700_and_everything_in_it_0600(tmp_path):
    # given a data folder an older version left open to all, with a world-readable database
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    (data / "keyvault.sqlite3").touch()
    (data / "keyvault.sqlite3").chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update(DJANGO_SETTINGS_MODULE="keyvault.settings", HMD_DATA_DIR=str(data), HMD_DEBUG="true")
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)

    # when Keyvault migrates and then runs (web, worker and beat write their state)
    migrated = subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180, preexec_fn=_as_a_shell_would())
    assert migrated.returncode == 0, migrated.stderr
    ran = subprocess.run([sys.executable, "-c", WRITE_STATE_AND_LIST_MODES], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180, preexec_fn=_as_a_shell_would())
    assert ran.returncode == 0, ran.stderr
    modes = json.loads(ran.stdout.strip().splitlines()[-1])

    # then the folder and every folder in it are 0700, every file 0600
    assert {"keyvault.sqlite3", "keyvault.sqlite3-wal", "keyvault.sqlite3-shm", "local-kms.keyring",
            "secret_key", "audit_hmac_key", "broker/queue"} <= set(modes), sorted(modes)
    assert any(name.startswith("celerybeat-schedule") for name in modes)
    assert any(name.startswith("broker/queue/") for name in modes), "no broker message was written"
    folders = {name for name in modes if (data / name).is_dir()}
    assert {name: oct(mode) for name, mode in modes.items() if name in folders and mode != 0o700} == {}
    assert {name: oct(mode) for name, mode in modes.items() if name not in folders and mode & 0o077} == {}
