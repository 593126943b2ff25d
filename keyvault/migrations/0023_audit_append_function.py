"""``keyvault_audit_append``: chain events in one statement on PostgreSQL (issue 17).

Appending from Python took several round trips while the chain head was locked (read the
head, insert the events, move the head), and every other appender waited for each of them.
The function does the same work inside the server: lock the head, give each event the next
sequence and its hash, insert them, move the head, in one call.

The events arrive as one JSON array (one parameter: psycopg's client-side quoting of a
dozen array parameters cost 13 ms per 100 events, more than the append itself).
The hash stays the one :func:`keyvault.audit.canonical_bytes` defines. Python sends each
event's canonical JSON in three pieces around the two values only the head decides (the
previous hash and the sequence, neither of which needs escaping); the function hashes
``before_prev || prev_hash || before_sequence || sequence || after_sequence``.
``audit verify`` recomputes every hash in Python, and a test compares the two on generated events.

``checkpoint_interval`` > 0: append nothing (no rows) if one of the events would fall on a
checkpoint (a multiple of it). A caller outside any transaction calls the function as a
statement of its own, so the head is locked only inside the server, never across a round trip
to a client; a checkpoint must be signed (in Python: the key is not in the database) in the
transaction that appends its event, so those few calls append in a transaction instead.

``try_only``: take the appenders' advisory lock and the head only if both are free, else
return no rows (group commit's uncontended path). The head is created if missing, unless
``try_only`` (the outbox append creates it then).
"""

from django.db import migrations

INSTALL = """
CREATE OR REPLACE FUNCTION keyvault_audit_append(try_only boolean, lock_key bigint, checkpoint_interval integer,
                                                 p_events jsonb)
RETURNS TABLE (event_id bigint, event_sequence bigint, event_prev_hash text, event_hash text) AS $$
DECLARE
    head_sequence bigint;
    head_hash text;
    event jsonb;
    sequences bigint[] := '{}';
    prevs text[] := '{}';
    hashes text[] := '{}';
    digest text;
BEGIN
    IF try_only THEN
        SELECT h.last_sequence, h.last_hash INTO head_sequence, head_hash FROM keyvault_auditchainhead h
            WHERE h.id = 1 AND pg_try_advisory_xact_lock(lock_key) FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    ELSE
        SELECT h.last_sequence, h.last_hash INTO head_sequence, head_hash FROM keyvault_auditchainhead h
            WHERE h.id = 1 FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO keyvault_auditchainhead (id, last_sequence, last_hash) VALUES (1, 0, repeat('0', 64))
                ON CONFLICT (id) DO NOTHING;
            SELECT h.last_sequence, h.last_hash INTO head_sequence, head_hash FROM keyvault_auditchainhead h
                WHERE h.id = 1 FOR UPDATE;
        END IF;
    END IF;
    IF checkpoint_interval > 0 AND (head_sequence + jsonb_array_length(p_events)) / checkpoint_interval
            > head_sequence / checkpoint_interval THEN
        RETURN;  -- a checkpoint falls due: the caller appends in a transaction that signs it
    END IF;
    FOR event IN SELECT value FROM jsonb_array_elements(p_events) LOOP
        head_sequence := head_sequence + 1;
        digest := encode(sha256(convert_to(
            (event->>'before_prev') || head_hash || (event->>'before_sequence') || head_sequence::text
                || (event->>'after_sequence'),
            'UTF8')), 'hex');
        sequences := array_append(sequences, head_sequence);
        prevs := array_append(prevs, head_hash);
        hashes := array_append(hashes, digest);
        head_hash := digest;
    END LOOP;
    IF coalesce(array_length(sequences, 1), 0) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH appended AS (
        INSERT INTO keyvault_auditevent (sequence, timestamp, actor, action, target_type, target_id, outcome,
                                         request_id, ip_address, details, prev_hash, hash)
        SELECT sequences[n], (e->>'timestamp')::timestamptz, e->>'actor', e->>'action', e->>'target_type',
               e->>'target_id', e->>'outcome', e->>'request_id', (e->>'ip_address')::inet, e->'details',
               prevs[n], hashes[n]
        FROM jsonb_array_elements(p_events) WITH ORDINALITY AS x(e, n)
        RETURNING id, sequence, prev_hash::text, hash::text
    )
    SELECT * FROM appended ORDER BY sequence;
    UPDATE keyvault_auditchainhead SET last_sequence = head_sequence, last_hash = head_hash WHERE id = 1;
END;
$$ LANGUAGE plpgsql;
"""

REMOVE = "DROP FUNCTION IF EXISTS keyvault_audit_append(boolean, bigint, integer, jsonb);"


def install(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(INSTALL)


def remove(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(REMOVE)


class Migration(migrations.Migration):

    dependencies = [
        ("keyvault", "0022_api_client_token_secret_type"),
    ]

    operations = [migrations.RunPython(install, remove)]
