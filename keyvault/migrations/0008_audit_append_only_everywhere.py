"""Append-only storage for the whole audit trail: events, checkpoints and the chain head.

Migration 0002 guarded only the events, and let any session lift its TRUNCATE block
with ``SET keyvault.allow_audit_truncate = 'on'``. Now, on PostgreSQL:

- ``keyvault_auditevent`` and ``keyvault_auditcheckpoint`` refuse UPDATE, DELETE and
  TRUNCATE, whatever the session sets;
- ``keyvault_auditchainhead`` refuses DELETE and TRUNCATE; an UPDATE must leave the
  row unchanged or move it forward to an event that exists with that sequence and
  hash; an INSERT may only create the genesis row (row 1, so there is never a second).

Triggers bind every role except one that may disable them: the table owner (the role
that runs migrations) and superusers. So production runs the web and worker processes
as a role that owns nothing (docs/ops/production.md, "Runtime role"; ``check --deploy``
warns otherwise), and the hash chain, signed checkpoints and the external witness, not
these triggers, are what prove the log intact against an owner.

SQLite has no roles and no TRUNCATE; the same rules are SQLite triggers, which stop the
application's own connection (and anyone without write access to the file) from
rewriting the trail. The models and their querysets refuse the same changes (models.py).

A later migration that alters one of these tables must keep the triggers: on SQLite
Django alters a table by rebuilding it, which drops the table's triggers, and the
rebuild of ``keyvault_auditevent`` fails while the head's trigger names it. On SQLite
such a migration drops ``SQLITE_TRIGGERS`` before its operations and runs
``SQLITE_INSTALL`` after (``importlib.import_module`` this module; PostgreSQL alters
tables in place and keeps them). tests/keyvault/audit/test_append_only.py fails if a
trigger is missing.
"""

from django.db import migrations

GENESIS_HASH = "0" * 64

POSTGRES_INSTALL = f"""
CREATE OR REPLACE FUNCTION keyvault_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER keyvault_auditcheckpoint_no_update_delete
    BEFORE UPDATE OR DELETE ON keyvault_auditcheckpoint
    FOR EACH ROW EXECUTE FUNCTION keyvault_audit_append_only();

CREATE TRIGGER keyvault_auditcheckpoint_no_truncate
    BEFORE TRUNCATE ON keyvault_auditcheckpoint
    FOR EACH STATEMENT EXECUTE FUNCTION keyvault_audit_append_only();

-- The guard names the events table by the schema its own table is in, and resolves everything
-- else in pg_catalog with pg_temp last: a session's temporary table called keyvault_auditevent
-- (any role may create one) must not vouch for an event that does not exist.
CREATE OR REPLACE FUNCTION keyvault_audit_chain_head_guard() RETURNS trigger AS $$
DECLARE
    recorded boolean;
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- Only row 1 at the genesis position; the primary key refuses a second copy of it
        -- (as a unique violation, which a writer racing to create it expects: audit._locked_head).
        IF NEW.id = 1 AND NEW.last_sequence = 0 AND NEW.last_hash = '{GENESIS_HASH}' THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'keyvault_auditchainhead is append-only: only the genesis head may be inserted'
            USING ERRCODE = 'insufficient_privilege';
    ELSIF TG_OP = 'UPDATE' THEN
        IF NEW.id = OLD.id AND NEW.last_sequence = OLD.last_sequence AND NEW.last_hash = OLD.last_hash THEN
            RETURN NEW;
        END IF;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.keyvault_auditevent e WHERE e.sequence = $1 AND e.hash = $2)',
                       TG_TABLE_SCHEMA)
            INTO recorded USING NEW.last_sequence, NEW.last_hash;
        IF NEW.id = OLD.id AND NEW.last_sequence > OLD.last_sequence AND recorded THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'keyvault_auditchainhead is append-only: it only moves forward to a recorded event'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RAISE EXCEPTION 'keyvault_auditchainhead is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp;

CREATE TRIGGER keyvault_auditchainhead_guard
    BEFORE INSERT OR UPDATE OR DELETE ON keyvault_auditchainhead
    FOR EACH ROW EXECUTE FUNCTION keyvault_audit_chain_head_guard();

CREATE TRIGGER keyvault_auditchainhead_no_truncate
    BEFORE TRUNCATE ON keyvault_auditchainhead
    FOR EACH STATEMENT EXECUTE FUNCTION keyvault_audit_chain_head_guard();
"""

#: Migration 0002's function, bypass included, for unapplying this migration only.
POSTGRES_REMOVE = """
DROP TRIGGER IF EXISTS keyvault_auditchainhead_no_truncate ON keyvault_auditchainhead;
DROP TRIGGER IF EXISTS keyvault_auditchainhead_guard ON keyvault_auditchainhead;
DROP FUNCTION IF EXISTS keyvault_audit_chain_head_guard();
DROP TRIGGER IF EXISTS keyvault_auditcheckpoint_no_truncate ON keyvault_auditcheckpoint;
DROP TRIGGER IF EXISTS keyvault_auditcheckpoint_no_update_delete ON keyvault_auditcheckpoint;

CREATE OR REPLACE FUNCTION keyvault_audit_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' AND current_setting('keyvault.allow_audit_truncate', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'keyvault_auditevent is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
"""

#: Every trigger this migration and 0002 install on PostgreSQL, by table (keyvault/audit/checks.py looks for them).
POSTGRES_TRIGGERS = {
    "keyvault_auditevent": ("keyvault_audit_no_update_delete", "keyvault_audit_no_truncate"),
    "keyvault_auditcheckpoint": ("keyvault_auditcheckpoint_no_update_delete", "keyvault_auditcheckpoint_no_truncate"),
    "keyvault_auditchainhead": ("keyvault_auditchainhead_guard", "keyvault_auditchainhead_no_truncate"),
}


def _sqlite_refuse(table: str, operation: str) -> str:
    return f"""
CREATE TRIGGER {table}_no_{operation.lower()} BEFORE {operation} ON {table}
BEGIN
    SELECT RAISE(ABORT, '{table} is append-only: {operation} refused');
END"""


SQLITE_INSTALL = [
    _sqlite_refuse("keyvault_auditevent", "UPDATE"),
    _sqlite_refuse("keyvault_auditevent", "DELETE"),
    _sqlite_refuse("keyvault_auditcheckpoint", "UPDATE"),
    _sqlite_refuse("keyvault_auditcheckpoint", "DELETE"),
    _sqlite_refuse("keyvault_auditchainhead", "DELETE"),
    f"""
CREATE TRIGGER keyvault_auditchainhead_genesis_only BEFORE INSERT ON keyvault_auditchainhead
WHEN NOT (NEW.id = 1 AND NEW.last_sequence = 0 AND NEW.last_hash = '{GENESIS_HASH}')
BEGIN
    SELECT RAISE(ABORT, 'keyvault_auditchainhead is append-only: only the genesis head may be inserted');
END""",
    """
CREATE TRIGGER keyvault_auditchainhead_forward_only BEFORE UPDATE ON keyvault_auditchainhead
WHEN NOT (NEW.id = OLD.id AND (
          (NEW.last_sequence = OLD.last_sequence AND NEW.last_hash = OLD.last_hash)
          OR (NEW.last_sequence > OLD.last_sequence AND EXISTS (
              SELECT 1 FROM keyvault_auditevent e WHERE e.sequence = NEW.last_sequence AND e.hash = NEW.last_hash))))
BEGIN
    SELECT RAISE(ABORT, 'keyvault_auditchainhead is append-only: it only moves forward to a recorded event');
END""",
]

SQLITE_TRIGGERS = (
    "keyvault_auditevent_no_update",
    "keyvault_auditevent_no_delete",
    "keyvault_auditcheckpoint_no_update",
    "keyvault_auditcheckpoint_no_delete",
    "keyvault_auditchainhead_no_delete",
    "keyvault_auditchainhead_genesis_only",
    "keyvault_auditchainhead_forward_only",
)


def install(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(POSTGRES_INSTALL, params=None)
    elif vendor == "sqlite":
        for statement in SQLITE_INSTALL:
            schema_editor.execute(statement, params=None)


def remove(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(POSTGRES_REMOVE, params=None)
    elif vendor == "sqlite":
        for name in SQLITE_TRIGGERS:
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {name}", params=None)


class Migration(migrations.Migration):
    dependencies = [("keyvault", "0007_audit_verification_status")]
    operations = [migrations.RunPython(install, remove)]
