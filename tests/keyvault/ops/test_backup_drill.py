"""The backup and restore drill of docs/ops/backup.md, on real PostgreSQL, through ``manage.py`` as operators run it.

Given an instance (its own database and data folder) with two KEKs, data keys, audit
events and a witnessed checkpoint, backed up the documented way (``pg_dump``; the
keyring and the witness copied; the master key and audit keys kept apart, as a secret
manager would), then rotated and backed up again, then destroyed: each restore goes
into a FRESH database and data folder, and ``manage.py backup verify`` runs against it
as a subprocess. Pieces from the same moment verify; a database and a keyring from
either side of the rotation are reported, by KEK version, reason and data key id, with
a non-zero exit: nothing is silently lost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import environ
import pytest

from tests.scratch import Scratch

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: What the data folder holds that a restore needs, keyring then witness (the rest is cache, broker and schedule).
DATA_FILES = ("local-kms.keyring", "audit-witness.jsonl")
#: Development secrets the instance generated into its data folder; in production they come from a
#: secret manager. The backup keeps them apart from the database dump and the data folder copy.
SECRET_FILES = {
    "HMD_LOCAL_KMS_MASTER_KEY_FILE": "local_kms_master_key",
    "HMD_AUDIT_SIGNING_KEY_FILE": "audit_signing_key",
    "HMD_AUDIT_HMAC_KEY_FILE": "audit_hmac_key",
    "HMD_SECRET_KEY_FILE": "secret_key",
}


@dataclass(frozen=True)
class Server:
    """The PostgreSQL server of ``HMD_DATABASE_URL``, and the prefix this run's databases take."""

    host: str
    port: str
    user: str
    password: str
    prefix: str

    def url(self, database: str) -> str:
        auth = f"{self.user}:{self.password}" if self.password else self.user
        return f"postgres://{auth}@{self.host}:{self.port}/{database}"

    def tool(self, name: str, *args: str) -> None:
        env = {**os.environ, "PGPASSWORD": self.password} if self.password else None
        result = subprocess.run([name, "-h", self.host, "-p", self.port, "-U", self.user, *args],
                                capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, f"{name} {' '.join(args)}: {result.stderr or result.stdout}"


@dataclass(frozen=True)
class Backup:
    """One backup: the dump and the data files (together), the secrets (elsewhere)."""

    dump: Path
    files: Path


@pytest.fixture(scope="module")
def server() -> Server:
    url = os.environ.get("HMD_DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        pytest.fail("postgres-marked tests run only on PostgreSQL (set HMD_DATABASE_URL; scripts/test.sh deselects "
                    "them elsewhere)")
    config = environ.Env.db_url_config(url)
    return Server(host=str(config["HOST"] or "127.0.0.1"), port=str(config["PORT"] or 5432),
                  user=config["USER"] or "postgres",
                  password=config.get("PASSWORD") or os.environ.get("HMD_DATABASE_PASSWORD", ""),
                  prefix=f"{config['NAME']}_drill_{uuid.uuid4().hex[:8]}")


class Drill:
    """Databases and folders of one drill run, all removed at the end."""

    def __init__(self, server: Server, root: Path):
        self.server, self.root, self.databases = server, root, []
        self.secrets = root / "secret-manager"  # stands for Vault / AWS Secrets Manager: not in any backup below

    def instance(self, name: str, *, secrets: bool = True) -> Scratch:
        """A fresh, empty database and data folder (``secrets``: the kept-apart secrets given as ``_FILE``)."""
        database = f"{self.server.prefix}_{name}"
        self.server.tool("createdb", database)
        self.databases.append(database)
        data_dir = self.root / name
        env = {"HMD_DATABASE_URL": self.server.url(database)}
        if secrets:
            env.update({variable: str(self.secrets / filename) for variable, filename in SECRET_FILES.items()})
        return Scratch(data_dir=data_dir, extra_env=env)

    def database_of(self, instance: Scratch) -> str:
        return instance.extra_env["HMD_DATABASE_URL"].rsplit("/", 1)[1]

    def back_up(self, instance: Scratch, label: str) -> Backup:
        """``pg_dump -Fc`` plus a copy of the keyring and the witness, as docs/ops/backup.md does."""
        folder = self.root / "backups" / label
        (folder / "files").mkdir(parents=True)
        dump = folder / "keyvault.dump"
        self.server.tool("pg_dump", "-Fc", "-f", str(dump), self.database_of(instance))
        for name in DATA_FILES:
            shutil.copy2(instance.data_dir / name, folder / "files" / name)
        return Backup(dump=dump, files=folder / "files")

    def keep_secrets_apart(self, instance: Scratch) -> None:
        self.secrets.mkdir(mode=0o700)
        for filename in SECRET_FILES.values():
            shutil.copy2(instance.data_dir / filename, self.secrets / filename)

    def destroy(self, instance: Scratch) -> None:
        database = self.database_of(instance)
        self.server.tool("dropdb", database)
        self.databases.remove(database)
        shutil.rmtree(instance.data_dir)

    def restore(self, name: str, *, database: Backup, keyring: Backup | None = None, witness: Backup | None = None,
                secrets: bool = True) -> Scratch:
        """``pg_restore`` into a new database, the keyring and witness (default: the database's backup's) into a
        new 0700 data folder."""
        target = self.instance(name, secrets=secrets)
        self.server.tool("pg_restore", "--no-owner", "--exit-on-error", "-d", self.database_of(target),
                         str(database.dump))
        target.data_dir.mkdir(mode=0o700)
        for filename, backup in zip(DATA_FILES, (keyring or database, witness or database), strict=True):
            shutil.copy2(backup.files / filename, target.data_dir / filename)
        return target

    def drop_all(self) -> None:
        for database in list(self.databases):
            self.server.tool("dropdb", "--if-exists", database)


def verify(instance: Scratch, *args: str) -> tuple[int, dict, str]:
    result = instance.run("backup", "verify", "--json", *args, check=False, timeout=180)
    return result.returncode, json.loads(result.stdout), result.stderr.decode()


def versions(report: dict) -> dict[tuple[str, int], dict]:
    return {(row["kek"], row["version"]): row for row in report["versions"]}


@pytest.fixture(scope="module")
def drilled(server, tmp_path_factory) -> Iterator[tuple[Drill, Backup, Backup, dict]]:
    """The instance set up, backed up before and after a rotation of ``payments``, and destroyed."""
    drill = Drill(server, tmp_path_factory.mktemp("drill"))
    try:
        source = drill.instance("source", secrets=False)
        source.run("migrate", "-v0", timeout=240)
        source.run("kms", "create-key", "payments")
        source.run("kms", "create-key", "billing")
        source.run("rotation", "policy", "--kek", "payments", "--grace", "0s")  # the rotation retires v1 at once
        ids = {"payments": [], "billing": []}
        for kek, tenant in (("payments", "a"), ("payments", "b"), ("payments", "c"), ("billing", "a"), ("billing", "b")):
            out = source.run("kms", "generate-data-key", "--key", kek, "--context", f"tenant={tenant}").stdout
            ids[kek].append(json.loads(out)["data_key_id"])
        source.run("audit", "checkpoint")
        drill.keep_secrets_apart(source)
        before = drill.back_up(source, "before-rotation")

        source.run("rotation", "start", "--kek", "payments", "--inline", "--wait", "--reason", "drill", timeout=180)
        out = source.run("kms", "generate-data-key", "--key", "payments", "--context", "tenant=d").stdout
        ids["after"] = [json.loads(out)["data_key_id"]]
        source.run("audit", "checkpoint")
        after = drill.back_up(source, "after-rotation")

        drill.destroy(source)
        assert not source.data_dir.exists()
        yield drill, before, after, ids
    finally:
        drill.drop_all()


def test_a_restore_from_one_backup_verifies(drilled):
    drill, before, _, ids = drilled
    # given the database, keyring and witness of the same backup, restored into a fresh database and folder
    restored = drill.restore("same-backup", database=before)

    # when the restore is verified
    code, report, _ = verify(restored)

    # then every data key opened, per KEK version, and the chain verified against the restored witness
    assert code == 0, report
    assert report["ok"] is True
    assert report["data_keys"] == {"checked": 5, "ok": 5, "failed": 0, "skipped": 0}
    rows = versions(report)
    assert rows[("payments", 1)]["ok"] == 3 and rows[("billing", 1)]["ok"] == 2
    assert report["findings"] == []
    assert report["audit"]["ok"] is True and "witnessed to #" in report["audit"]["result"]
    # and the text report says so too, and the instance still serves its data keys
    text = restored.run("backup", "verify", "--quiet").stdout.decode()
    assert "payments v1: ok — 3 ok, 0 failed" in text and "OK: restore verified" in text
    restored.run("kms", "describe-key", "payments")


def test_the_backup_taken_after_the_rotation_verifies(drilled):
    drill, _, after, ids = drilled
    restored = drill.restore("after-backup", database=after)

    code, report, _ = verify(restored)

    assert code == 0, report
    rows = versions(report)
    assert rows[("payments", 2)]["ok"] == 4 and rows[("billing", 1)]["ok"] == 2
    assert ("payments", 1) not in rows  # every data key was rewrapped to v2 before v1 was retired
    assert report["data_keys"] == {"checked": 6, "ok": 6, "failed": 0, "skipped": 0}


def test_an_old_database_with_a_newer_keyring_reports_the_retired_version(drilled):
    drill, before, after, ids = drilled
    # given the database from before the rotation but the keyring from after it (v1 retired there)
    restored = drill.restore("old-db-new-keyring", database=before, keyring=after)

    code, report, stderr = verify(restored)

    # then the three payments data keys are named, counted and typed; billing is fine; the exit is non-zero
    assert code == 1 and report["ok"] is False
    assert "restore NOT verified: 3 data key(s) failed" in stderr
    rows = versions(report)
    assert rows[("payments", 1)]["ok"] == 0
    assert rows[("payments", 1)]["failed"] == {"version_retired": 3}
    assert sorted(rows[("payments", 1)]["failed_data_keys"]["version_retired"]) == sorted(ids["payments"])
    assert rows[("billing", 1)]["ok"] == 2 and rows[("billing", 1)]["failed"] == {}
    assert "keyring newer than database" in report["reasons"]["version_retired"]
    findings = {(f["kek"], f["version"], f["reason"]) for f in report["findings"]}
    assert ("payments", 1, "version_retired") in findings  # enabled in the database, disabled in the keyring
    assert ("payments", None, None) in findings  # v2 at the provider, unknown to the database: a warning
    assert report["audit"]["ok"] is True  # the chain and its witness are from the same backup


def test_a_new_database_with_an_older_keyring_reports_the_missing_version(drilled):
    drill, before, after, ids = drilled
    # given the database from after the rotation but the keyring from before it (no v2 in it)
    restored = drill.restore("new-db-old-keyring", database=after, keyring=before)

    code, report, _ = verify(restored)

    # then all four payments data keys (three rewrapped, one created after the backup) are reported
    assert code == 1 and report["ok"] is False
    rows = versions(report)
    assert rows[("payments", 2)]["failed"] == {"version_missing": 4}
    assert sorted(rows[("payments", 2)]["failed_data_keys"]["version_missing"]) == sorted(ids["payments"] + ids["after"])
    assert "keyring older than database" in report["reasons"]["version_missing"]
    assert ("payments", 2, "version_missing") in {(f["kek"], f["version"], f["reason"]) for f in report["findings"]}
    assert rows[("billing", 1)]["ok"] == 2
    # and the text report names them for the operator
    text = restored.run("backup", "verify", "--quiet", check=False).stdout.decode()
    assert "payments v2: FAILED — 0 ok, 4 failed" in text
    assert f"#{ids['after'][0]}" in text


def test_a_witness_newer_than_the_database_breaks_the_audit_check(drilled):
    drill, before, after, _ = drilled
    # given the old backup restored, checked against the witness copy from after the rotation
    restored = drill.restore("old-db-new-witness", database=before)

    code, report, _ = verify(restored, "--witness", str(after.files / "audit-witness.jsonl"))

    # then the data keys are fine but the chain is shorter than witnessed: events after the backup are gone
    assert code == 1
    assert report["data_keys"]["failed"] == 0
    assert report["audit"]["ok"] is False and "chain shorter than witnessed" in report["audit"]["result"]


def test_a_restore_without_the_master_key_reports_every_data_key(drilled):
    drill, before, _, ids = drilled
    # given database and keyring restored but not the master key (development mode makes up a new one)
    restored = drill.restore("no-master-key", database=before, secrets=False)

    code, report, _ = verify(restored, "--no-witness")

    # then nothing opens, and the report says why for every KEK
    assert code == 1
    assert report["data_keys"] == {"checked": 5, "ok": 0, "failed": 5, "skipped": 0}
    assert {f["reason"] for f in report["findings"]} == {"provider_unavailable"}
    assert all("HMD_LOCAL_KMS_MASTER_KEY" in f["detail"] for f in report["findings"])
