"""The runtime role of docs/ops/production.md, on a real PostgreSQL server: it appends, it cannot rewrite.

The roles and grants are the ``sql`` blocks of the document itself (only the role and
database names are made unique for the run), so the document cannot drift from what is
proven here. Roles are cluster-wide: every test drops what it created.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest
from django.core import checks
from django.db import connection, transaction

from keyvault import audit
from keyvault.audit import Action, Actor
from keyvault.audit import checks as checks_audit
from keyvault.models import AuditChainHead, AuditCheckpoint, AuditEvent, AuditPendingEvent
from tests.audit_owner import AUDIT_TABLES
from tests.conftest import is_postgres
from tests.docs.examples import ROOT, blocks

PRODUCTION_DOC = ROOT / "docs" / "ops" / "production.md"
DOCUMENTED_ROLES = ("keyvault_owner", "keyvault_app")


def documented(tag: str, language: str = "sql") -> str:
    [block] = [b for b in blocks(PRODUCTION_DOC) if b.language == language and tag in b.tags]
    return block.text


@dataclass(frozen=True)
class Roles:
    owner: str
    app: str
    database: str

    def adapt(self, sql: str) -> str:
        """The documented SQL with this run's role and database names."""
        sql = re.sub(r"\bkeyvault_owner\b", self.owner, sql)
        sql = re.sub(r"\bkeyvault_app\b", self.app, sql)
        return re.sub(r"\bkeyvault\b", self.database, sql)  # what is left is the database name


@pytest.fixture
def documented_roles(transactional_db) -> Iterator[Roles]:
    """The migration and runtime roles, created and granted exactly as production.md says."""
    if not is_postgres():
        pytest.fail("postgres-marked tests run only on PostgreSQL (scripts/test.sh deselects them elsewhere)")
    suffix = uuid.uuid4().hex[:10]
    roles = Roles(owner=f"kv_owner_{suffix}", app=f"kv_app_{suffix}", database=connection.settings_dict["NAME"])
    with connection.cursor() as cursor:
        cursor.execute(roles.adapt(documented("runtime-role-setup")))
        try:
            cursor.execute(roles.adapt(documented("runtime-role-grants")))
            yield roles
        finally:
            cursor.execute(f'GRANT CONNECT ON DATABASE "{roles.database}" TO PUBLIC')
            for role in (roles.app, roles.owner):
                cursor.execute(f'DROP OWNED BY "{role}"')
                cursor.execute(f'DROP ROLE "{role}"')


@contextmanager
def login(role: str) -> Iterator[psycopg.Connection]:
    """A connection of its own as ``role``, as web or a worker would open with the runtime URL."""
    settings = connection.settings_dict
    with psycopg.connect(host=settings["HOST"] or "127.0.0.1", port=settings["PORT"] or 5432,
                         dbname=settings["NAME"], user=role, autocommit=True) as conn:
        yield conn


def refused(conn: psycopg.Connection, *statements: str, match: str | None = None) -> None:
    """All of ``statements`` in one transaction must fail for lack of privilege (SQLSTATE 42501)."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match=match):
        with conn.transaction():
            for statement in statements:
                conn.execute(statement)


def head() -> tuple[int, str]:
    return AuditChainHead.objects.values_list("last_sequence", "last_hash").get(pk=1)


@pytest.mark.postgres
@pytest.mark.parametrize("group_commit", [False, True], ids=["serial", "group-commit"])
def test_runtime_role_runs_the_append_path(documented_roles, settings, group_commit):
    # given the documented runtime role, as the current role of the application's connection
    settings.AUDIT_GROUP_COMMIT = group_commit
    actor = Actor.system("tests")

    # when the application records events (creating the genesis head; with group commit they are
    # appended after the transaction commits, still as that role), and signs checkpoints
    with connection.cursor() as cursor:
        cursor.execute(f'SET ROLE "{documented_roles.app}"')
        try:
            with transaction.atomic():
                for i in range(4):
                    audit.record(Action.OTHER, actor=actor, target=("thing", i))
            audit.checkpoint(actor=actor)
            # and the deploy check, as that role, is silent
            problems = checks_audit.check_audit_tables_out_of_reach()
            cursor.execute("SELECT current_user")
            [(current_user,)] = cursor.fetchall()
        finally:
            cursor.execute("RESET ROLE")

    # then everything was written as the runtime role, and the chain is intact
    assert current_user == documented_roles.app
    assert problems == []
    assert list(AuditEvent.objects.order_by("sequence").values_list("sequence", "action")) == [
        *((i, Action.OTHER) for i in range(1, 5)), (5, Action.AUDIT_CHECKPOINT)]
    assert not AuditPendingEvent.objects.exists()
    last = AuditEvent.objects.order_by("-sequence").first()
    assert head() == (last.sequence, last.hash)
    assert AuditCheckpoint.objects.filter(sequence=last.sequence).exists()
    assert audit.verify_chain().ok


@pytest.mark.postgres
def test_runtime_role_cannot_switch_the_triggers_off_or_rewrite_the_trail(documented_roles):
    # given a chain of six events or more, and a signed checkpoint
    events = [audit.record(Action.OTHER, actor=Actor.system("tests"), target=("thing", i)) for i in range(6)]
    audit.checkpoint(actor=Actor.system("tests"))
    events = list(AuditEvent.objects.order_by("sequence"))
    before = (AuditEvent.objects.count(), AuditCheckpoint.objects.count())

    with login(documented_roles.app) as conn:
        # the documented grants let it log in and read
        assert conn.execute("SELECT count(*) FROM keyvault_auditevent").fetchone() == (before[0],)

        # it cannot switch the append-only triggers off, in any of the ways an owner or superuser can
        for table in AUDIT_TABLES:
            refused(conn, f"ALTER TABLE {table} DISABLE TRIGGER USER", match="owner")
            refused(conn, f"ALTER TABLE {table} OWNER TO {documented_roles.app}", match="owner")
        refused(conn, "DROP TRIGGER keyvault_audit_no_update_delete ON keyvault_auditevent", match="owner")
        refused(conn, "SET session_replication_role = replica", match="permission denied")

        # the bypass any session once had is gone
        refused(conn, "SET LOCAL keyvault.allow_audit_truncate = 'on'", "TRUNCATE keyvault_auditevent")

        # it cannot change or remove events or checkpoints
        for table in ("keyvault_auditevent", "keyvault_auditcheckpoint"):
            refused(conn, f"UPDATE {table} SET sequence = sequence + 100")
            refused(conn, f"DELETE FROM {table}")
            refused(conn, f"TRUNCATE {table}")

        # it may move the head, but only forward to a recorded event: the trigger refuses the rest
        refused(conn, f"UPDATE keyvault_auditchainhead SET last_sequence = {events[3].sequence},"
                      f" last_hash = '{events[3].hash}'", match="append-only")
        refused(conn, f"UPDATE keyvault_auditchainhead SET last_sequence = {events[-1].sequence + 1},"
                      " last_hash = repeat('a', 64)", match="append-only")
        refused(conn, "DELETE FROM keyvault_auditchainhead")
        refused(conn, "TRUNCATE keyvault_auditchainhead")

    # then the trail is as it was
    assert (AuditEvent.objects.count(), AuditCheckpoint.objects.count()) == before
    assert head() == (events[-1].sequence, events[-1].hash)
    assert audit.verify_chain().ok


@pytest.mark.postgres
def test_a_temporary_table_cannot_vouch_for_the_head(documented_roles):
    # given a chain, and the runtime role's own temporary table named like the events table
    events = [audit.record(Action.OTHER, actor=Actor.system("tests"), target=("thing", i)) for i in range(3)]
    forged_sequence, forged_hash = events[-1].sequence + 1, "b" * 64

    with login(documented_roles.app) as conn:
        conn.execute("CREATE TEMPORARY TABLE keyvault_auditevent (sequence bigint, hash varchar(64))")
        conn.execute("INSERT INTO keyvault_auditevent VALUES (%s, %s)", (forged_sequence, forged_hash))

        # when it moves the head to the event only its temporary table holds, then it is refused
        refused(conn, f"UPDATE keyvault_auditchainhead SET last_sequence = {forged_sequence},"
                      f" last_hash = '{forged_hash}'", match="append-only")

    assert head() == (events[-1].sequence, events[-1].hash)


class _RolledBack(Exception):
    """Raised to roll a test's grants back."""


@pytest.mark.postgres
def test_deploy_check_warns_when_the_runtime_role_may_set_the_replication_role(documented_roles):
    # given a runtime role someone allowed to set session_replication_role (PostgreSQL 15+), in a
    # transaction rolled back afterwards
    with pytest.raises(_RolledBack), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f'GRANT SET ON PARAMETER session_replication_role TO "{documented_roles.app}"')
        cursor.execute(f'SET LOCAL ROLE "{documented_roles.app}"')

        # when the deploy check runs as that role
        found = checks_audit.check_audit_tables_out_of_reach()
        raise _RolledBack

    # then it says the triggers can be bypassed
    assert [message.id for message in found] == [checks_audit.SUPERUSER_ID]


@pytest.mark.postgres
@pytest.mark.django_db
def test_deploy_check_warns_when_the_database_user_owns_the_audit_tables():
    # given the test database's user: it created (owns) the tables and is a superuser
    if not is_postgres():
        pytest.fail("postgres-marked tests run only on PostgreSQL")

    # when the deploy checks run
    found = checks.run_checks(include_deployment_checks=True, tags=[checks.Tags.security])

    # then both the ownership and the superuser warnings are given, and they name the remedy
    ids = {message.id for message in found}
    assert {checks_audit.OWNER_ID, checks_audit.SUPERUSER_ID} <= ids
    owner = next(message for message in found if message.id == checks_audit.OWNER_ID)
    assert "keyvault_auditevent" in owner.msg and "production.md" in owner.hint
    assert checks_audit.TRIGGERS_ID not in ids


@pytest.mark.postgres
@pytest.mark.django_db
def test_deploy_check_warns_when_an_append_only_trigger_is_off():
    if not is_postgres():
        pytest.fail("postgres-marked tests run only on PostgreSQL")

    # given an owner who switched one trigger off and forgot it (rolled back with the test)
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE keyvault_auditcheckpoint DISABLE TRIGGER keyvault_auditcheckpoint_no_truncate")

    found = checks_audit.check_audit_tables_out_of_reach()

    [off] = [message for message in found if message.id == checks_audit.TRIGGERS_ID]
    assert "keyvault_auditcheckpoint.keyvault_auditcheckpoint_no_truncate" in off.msg


def manage(*args: str, role: str, database: str, data_dir) -> subprocess.CompletedProcess:
    """``python manage.py ARGS`` with ``HMD_DATABASE_URL`` naming ``role``, as a deployment would run it."""
    settings = connection.settings_dict
    url = f"postgres://{role}@{settings['HOST'] or '127.0.0.1'}:{settings['PORT'] or 5432}/{database}"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "keyvault.settings", "HMD_DATABASE_URL": url,
           "HMD_DATA_DIR": str(data_dir), "HMD_DEBUG": "true"}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.django_db
def test_the_documented_procedure_end_to_end(tmp_path):
    """Roles, a database owned by the migration role, migrate as it, grants as it: production.md, verbatim."""
    if not is_postgres():
        pytest.fail("postgres-marked tests run only on PostgreSQL")
    suffix = uuid.uuid4().hex[:10]
    roles = Roles(owner=f"kv_owner_{suffix}", app=f"kv_app_{suffix}", database=f"kv_roles_{suffix}")
    settings = connection.settings_dict
    server = {"PGHOST": settings["HOST"] or "127.0.0.1", "PGPORT": str(settings["PORT"] or 5432)}
    superuser = psycopg.connect(host=server["PGHOST"], port=server["PGPORT"], dbname=settings["NAME"],
                                user=settings["USER"], autocommit=True)
    try:
        # given the roles and the database, created as the document says
        superuser.execute(roles.adapt(documented("runtime-role-setup")))
        subprocess.run(["bash", "-euo", "pipefail", "-c", roles.adapt(documented("runtime-role-database", "shell"))],
                       env={**os.environ, **server}, check=True, capture_output=True, timeout=60)

        # when the migration role migrates and grants, and each role runs check --deploy
        migrated = manage("migrate", "--no-input", role=roles.owner, database=roles.database, data_dir=tmp_path)
        assert migrated.returncode == 0, migrated.stderr[-2000:]
        with psycopg.connect(host=server["PGHOST"], port=server["PGPORT"], dbname=roles.database, user=roles.owner,
                             autocommit=True) as owner:
            owner.execute(roles.adapt(documented("runtime-role-grants")))
        as_owner = manage("check", "--deploy", role=roles.owner, database=roles.database, data_dir=tmp_path)
        as_app = manage("check", "--deploy", role=roles.app, database=roles.database, data_dir=tmp_path)
        appended = manage("audit", "checkpoint", role=roles.app, database=roles.database, data_dir=tmp_path)
        verified = manage("audit", "verify", role=roles.app, database=roles.database, data_dir=tmp_path)

        # then the owner is warned about, the runtime role is not, and the runtime role appends
        assert checks_audit.OWNER_ID in as_owner.stdout + as_owner.stderr
        assert "keyvault.W30" not in as_app.stdout + as_app.stderr, as_app.stderr[-2000:]
        assert appended.returncode == 0 and "signed checkpoint at #" in appended.stdout, appended.stderr[-2000:]
        assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stdout + verified.stderr[-2000:]
    finally:
        superuser.execute(f'DROP DATABASE IF EXISTS "{roles.database}" WITH (FORCE)')
        for role in (roles.app, roles.owner):
            superuser.execute(f'DROP ROLE IF EXISTS "{role}"')
        superuser.close()


def test_the_check_runs_with_check_deploy():
    assert checks_audit.check_audit_tables_out_of_reach in checks.registry.registry.get_checks(
        include_deployment_checks=True)
    assert checks_audit.check_audit_tables_out_of_reach not in checks.registry.registry.get_checks()


@pytest.mark.django_db
def test_the_check_speaks_only_where_roles_exist():
    """SQLite has no roles to separate: nothing to say. The suite's PostgreSQL user owns the tables: a warning."""
    found = checks_audit.check_audit_tables_out_of_reach()

    if is_postgres():
        assert found and all(message.id.startswith("keyvault.W30") for message in found)
    else:
        assert found == []
