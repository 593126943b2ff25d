"""Acting on the audit tables as their owner: the only way past the append-only triggers.

Migration 0008 makes events, checkpoints and the chain head append-only for every
session. Two kinds of test code must get past that, as an owner could:

- the test runner's flush between transactional tests (``install_flush_as_owner``);
- tamper tests that rewrite the trail the way an attacker who owns the tables would
  (``as_table_owner``).

On PostgreSQL that is ``ALTER TABLE … DISABLE TRIGGER USER``, which only the table's
owner (or a superuser) may run: the test database user owns the tables, the production
runtime role does not (docs/ops/production.md). Switching triggers off per table, inside
the same transaction as the statements, keeps it scoped: the ALTER is transactional, so
the triggers are back on at commit, or at rollback if a statement fails.
``session_replication_role = replica`` would also work for a superuser, but it silently
switches off every trigger and foreign-key check in every table for the session.

SQLite has no owners: whoever can write the file can drop a trigger, so the triggers on
the audit tables are dropped and re-created from their own saved definitions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connections, transaction

AUDIT_TABLES = ("keyvault_auditevent", "keyvault_auditcheckpoint", "keyvault_auditchainhead")


@contextmanager
def as_table_owner(using: str = "default", tables: tuple[str, ...] = AUDIT_TABLES) -> Iterator:
    """Yield a cursor for which the audit tables' triggers are off; they are back on afterwards."""
    connection = connections[using]
    with transaction.atomic(using=using), connection.cursor() as cursor:
        present = [table for table in tables if table in connection.introspection.table_names(cursor)]
        if connection.vendor == "postgresql":
            for table in present:
                cursor.execute(f"ALTER TABLE {connection.ops.quote_name(table)} DISABLE TRIGGER USER")
            yield cursor
            for table in present:
                cursor.execute(f"ALTER TABLE {connection.ops.quote_name(table)} ENABLE TRIGGER USER")
        elif connection.vendor == "sqlite" and present:
            marks = ", ".join("%s" for _ in present)
            cursor.execute(f"SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name IN ({marks})",
                           present)
            saved = cursor.fetchall()
            for name, _sql in saved:
                cursor.execute(f"DROP TRIGGER {connection.ops.quote_name(name)}")
            yield cursor
            for _name, sql in saved:
                cursor.execute(sql)
        else:
            yield cursor


def install_flush_as_owner() -> None:
    """Let the test runner's flush (TRUNCATE / DELETE of every table) empty the audit tables too."""
    from django.db.backends.base.operations import BaseDatabaseOperations

    original = BaseDatabaseOperations.execute_sql_flush
    if getattr(original, "keyvault_flushes_as_owner", False):
        return

    def execute_sql_flush(self, sql_list):
        with as_table_owner(self.connection.alias):
            return original(self, sql_list)

    execute_sql_flush.keyvault_flushes_as_owner = True
    BaseDatabaseOperations.execute_sql_flush = execute_sql_flush
