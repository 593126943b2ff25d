"""On PostgreSQL, make the audit table append-only at the database level.

UPDATE and DELETE are always rejected. TRUNCATE is rejected unless the session
sets ``keyvault.allow_audit_truncate = 'on'`` — only the test suite's database
flush does; a database owner can always drop a trigger, so the hash chain and
signed checkpoints, not this trigger, are what prove the log intact.
On SQLite the model and its queryset refuse changes instead.
"""

from django.db import migrations

INSTALL = """
CREATE OR REPLACE FUNCTION keyvault_audit_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' AND current_setting('keyvault.allow_audit_truncate', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'keyvault_auditevent is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER keyvault_audit_no_update_delete
    BEFORE UPDATE OR DELETE ON keyvault_auditevent
    FOR EACH ROW EXECUTE FUNCTION keyvault_audit_append_only();

CREATE TRIGGER keyvault_audit_no_truncate
    BEFORE TRUNCATE ON keyvault_auditevent
    FOR EACH STATEMENT EXECUTE FUNCTION keyvault_audit_append_only();
"""

REMOVE = """
DROP TRIGGER IF EXISTS keyvault_audit_no_truncate ON keyvault_auditevent;
DROP TRIGGER IF EXISTS keyvault_audit_no_update_delete ON keyvault_auditevent;
DROP FUNCTION IF EXISTS keyvault_audit_append_only();
"""


def install(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(INSTALL, params=None)


def remove(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(REMOVE, params=None)


class Migration(migrations.Migration):
    dependencies = [("keyvault", "0001_initial")]
    operations = [migrations.RunPython(install, remove)]
