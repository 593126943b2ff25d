"""Group commit's waiters append the outbox inside the server (issue 17).

A caller whose event went to the outbox (``AuditPendingEvent``) waited for it after its commit
in three to four round trips (is it still pending and is the appenders' lock free; wait for the
holder; ask again), and the one that took the lock appended in six more (begin, lock the head,
take the rows, hash them in Python, chain them, commit), while every other waiter waited for it.

The writer now stores each event's canonical JSON pieces with the outbox row
(``canonical_pieces``, as :func:`keyvault.audit._canonical_pieces` cuts them), so the
server needs nothing from Python to chain the row, and ``keyvault_audit_await`` does the
whole wait in one statement: if the caller's row is still pending, wait for the appenders'
lock (the waiters queue for it inside the server), and if the row is still pending then,
append the oldest outbox rows in batches through
``keyvault_audit_append`` and delete them, until the caller's row is in, and commit (the
statement is its own transaction).

It answers ``appended`` (the caller's row is in the chain) or, having appended nothing more,
``checkpoint`` (the next batch would reach a signed checkpoint: the key is not in the
database, so the caller appends that batch in a transaction that signs it) or ``python``
(a row without pieces, written before this migration: appended from Python).
"""

from django.db import migrations, models

INSTALL = """
CREATE OR REPLACE FUNCTION keyvault_audit_await(lock_key bigint, pending_id bigint, batch integer,
                                                checkpoint_interval integer)
RETURNS text AS $$
DECLARE
    events jsonb;
    ids bigint[];
    complete boolean;
    appended bigint;
BEGIN
    PERFORM 1 FROM keyvault_auditpendingevent WHERE id = pending_id;
    IF NOT FOUND THEN
        RETURN 'appended';
    END IF;
    -- Waiters queue for the lock (a try-lock loop livelocks, each waiter's retry failing
    -- every other's); each statement below sees what committed before it began.
    PERFORM pg_advisory_xact_lock(lock_key);
    PERFORM 1 FROM keyvault_auditpendingevent WHERE id = pending_id;
    IF NOT FOUND THEN
        RETURN 'appended';
    END IF;
    LOOP
        SELECT jsonb_agg(jsonb_build_object(
                   'timestamp', p.timestamp, 'actor', p.actor, 'action', p.action, 'target_type', p.target_type,
                   'target_id', p.target_id, 'outcome', p.outcome, 'request_id', p.request_id,
                   'ip_address', host(p.ip_address), 'details', p.details,
                   'before_prev', p.canonical_pieces->>0, 'before_sequence', p.canonical_pieces->>1,
                   'after_sequence', p.canonical_pieces->>2) ORDER BY p.id),
               array_agg(p.id ORDER BY p.id), bool_and(p.canonical_pieces IS NOT NULL)
          INTO events, ids, complete
          FROM (SELECT * FROM keyvault_auditpendingevent ORDER BY id LIMIT batch) p;  -- under the lock: nobody else takes rows
        IF ids IS NULL THEN
            RETURN 'appended';
        END IF;
        IF NOT complete THEN
            RETURN 'python';
        END IF;
        SELECT count(*) INTO appended FROM keyvault_audit_append(false, lock_key, checkpoint_interval, events);
        IF appended = 0 THEN
            RETURN 'checkpoint';
        END IF;
        DELETE FROM keyvault_auditpendingevent WHERE id = ANY(ids);
        -- Rows are taken oldest first: once the newest taken is the caller's or later, its row is in.
        -- Stopping there bounds this transaction however fast others keep writing.
        IF ids[array_length(ids, 1)] >= pending_id OR array_length(ids, 1) < batch THEN
            RETURN 'appended';
        END IF;
    END LOOP;
END;
$$ LANGUAGE plpgsql;
"""

REMOVE = "DROP FUNCTION IF EXISTS keyvault_audit_await(bigint, bigint, integer, integer);"


def install(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(INSTALL)


def remove(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(REMOVE)


class Migration(migrations.Migration):

    dependencies = [
        ("keyvault", "0024_audit_event_drop_redundant_indexes"),
    ]

    operations = [
        migrations.AddField(
            model_name="auditpendingevent",
            name="canonical_pieces",
            field=models.JSONField(blank=True, editable=False, null=True, verbose_name="canonical pieces"),
        ),
        migrations.RunPython(install, remove),
    ]
