"""``check --deploy``: the role the processes run as must not be able to switch off the audit triggers.

The append-only triggers on the audit tables (migrations 0002 and 0008) bind every
role except two: the tables' owner, who may ``ALTER TABLE … DISABLE TRIGGER``, and a
superuser, who may also set ``session_replication_role = replica``. Either one can
rewrite the trail in place, leaving only the hash chain, the signed checkpoints and the
external witness to notice. So web, worker and beat connect as a runtime role that owns
nothing (docs/ops/production.md, "Runtime role and migration role"), and this check
warns when the configured database user is not such a role, or when a trigger is
missing or disabled. Run it with the runtime ``HMD_DATABASE_URL``, not the one
``migrate`` uses. On SQLite there are no roles: whoever can write the file can drop a
trigger; the SQLite warnings are in ``keyvault.checks``.
"""

from __future__ import annotations

import importlib

from django.core.checks import Tags, Warning, register
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from keyvault.audit import witness as audit_witness
from keyvault.exceptions import AuditWitnessUnavailable

OWNER_ID = "keyvault.W301"
SUPERUSER_ID = "keyvault.W302"
TRIGGERS_ID = "keyvault.W303"
UNCHECKED_ID = "keyvault.W304"
HINT = ('Run web, worker and beat as a role that owns nothing and is no superuser; keep the owning role for '
        '"manage.py migrate" (docs/ops/production.md, "Runtime role and migration role").')

#: The triggers migration 0008 (and 0002 before it) install, by table.
EXPECTED_TRIGGERS: dict[str, tuple[str, ...]] = importlib.import_module(
    "keyvault.migrations.0008_audit_append_only_everywhere").POSTGRES_TRIGGERS
AUDIT_TABLES = tuple(EXPECTED_TRIGGERS)

_ROLE_SQL = """
SELECT current_user,
       r.rolsuper,
       COALESCE((SELECT array_agg(c.relname::text ORDER BY c.relname) FROM pg_class c
                 WHERE c.oid = ANY(%(tables)s::regclass[]) AND pg_has_role(current_user, c.relowner, 'MEMBER')),
                '{}')
FROM pg_roles r WHERE r.rolname = current_user
"""

# 'O' fires in ordinary sessions, 'A' always; 'D' is disabled and 'R' fires only in replica mode.
_TRIGGERS_SQL = """
SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.oid = ANY(%(tables)s::regclass[]) AND NOT t.tgisinternal AND t.tgenabled IN ('O', 'A')
"""


@register(Tags.security, deploy=True)
def check_audit_tables_out_of_reach(app_configs=None, **kwargs) -> list[Warning]:
    """Warn when the database user can disable the audit tables' append-only triggers, or one is off."""
    connection = connections[DEFAULT_DB_ALIAS]
    if connection.vendor != "postgresql":
        return []
    try:
        with connection.cursor() as cursor:
            return _problems(cursor, connection.pg_version)
    except DatabaseError as error:
        return [Warning(f"Could not check who can disable the audit triggers: {type(error).__name__}.",
                        hint=HINT, id=UNCHECKED_ID)]


def _problems(cursor, server_version: int) -> list[Warning]:
    present = _present_tables(cursor)
    if not present:
        return []  # not migrated yet: nothing to protect
    tables = {"tables": present}
    cursor.execute(_ROLE_SQL, tables)
    user, superuser, owned = cursor.fetchone()
    sets_replication_role = False  # before PostgreSQL 15 only superusers may
    if server_version >= 150000:
        cursor.execute("SELECT has_parameter_privilege('session_replication_role', 'SET')")
        [(sets_replication_role,)] = cursor.fetchall()
    found = []
    if owned:
        found.append(Warning(
            f'The database user "{user}" owns the audit tables ({", ".join(owned)}), or is a member of their '
            "owner: it can switch off their append-only triggers and rewrite the audit trail.",
            hint=HINT, id=OWNER_ID))
    if superuser or sets_replication_role:
        found.append(Warning(
            f'The database user "{user}" is a superuser or may set session_replication_role: it can bypass the '
            "audit tables' append-only triggers.", hint=HINT, id=SUPERUSER_ID))
    cursor.execute(_TRIGGERS_SQL, tables)
    enabled = set(cursor.fetchall())
    off = [f"{table}.{name}" for table, names in EXPECTED_TRIGGERS.items() if table in present
           for name in names if (table, name) not in enabled]
    if off:
        found.append(Warning(
            f"Append-only triggers missing or disabled: {', '.join(off)}. The audit trail can be changed in place.",
            hint='Run "manage.py migrate" as the owning role; re-enable with ALTER TABLE … ENABLE TRIGGER USER.',
            id=TRIGGERS_ID))
    return found


def _present_tables(cursor) -> list[str]:
    cursor.execute("SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NOT NULL", [list(AUDIT_TABLES)])
    return [row[0] for row in cursor.fetchall()]


WITNESS_ID = "keyvault.W305"


@register(Tags.security, deploy=True)
def check_a_witness_file_is_kept(app_configs=None, **kwargs) -> list[Warning]:
    """Without a witness file, ``audit verify`` (no ``--witness``) cannot see a chain cut back past a checkpoint."""
    try:
        witnesses = audit_witness.configured()
    except AuditWitnessUnavailable as exc:
        return [Warning(f"HMD_AUDIT_WITNESS cannot be used: {exc}", id=WITNESS_ID,
                        hint="Name a file, https://, syslog:// or s3:// destination (docs/ops/production.md).")]
    if any(isinstance(witness, audit_witness.FileWitness) for witness in witnesses):
        return []
    where = "no witness at all" if not witnesses else "only remote witnesses, which audit verify reads with --witness"
    return [Warning(
        f"HMD_AUDIT_WITNESS keeps no witness file ({where}): a routine 'audit verify' would not notice a database "
        "owner cutting the audit chain back past a checkpoint.",
        hint="Keep the default file (HMD_DATA_DIR/audit-witness.jsonl) next to any remote witness, or have "
             "audits run 'audit verify --witness s3://…' (docs/ops/production.md, \"Audit witness\").",
        id=WITNESS_ID,
    )]
