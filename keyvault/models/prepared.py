"""Cursors whose statements PostgreSQL parses and plans once per connection, for the hot paths.

Django's psycopg backend binds parameters on the client (``ClientCursor``): every statement
reaches the server as new text, so the server parses and plans it again on every call. For
the application API's two statements per call (read the data key, append the audit event)
that was a third of PostgreSQL's CPU per unwrap (perf, bench/README.md, stop 27). A
:func:`prepared_cursor` binds on the server, and psycopg prepares a statement once it has run
``prepare_threshold`` times on a connection (5 by default); after that a call sends only its
parameters.

While queries are logged (``DEBUG``, ``assertNumQueries``) the connection's ordinary cursor is
returned instead: psycopg keeps no text of a statement it ran prepared, and the log should
show the statement as it ran. The statements below are written to run either way.

Only statements written for it go through one: server-side binding takes a parameter where
PostgreSQL accepts one (``= ANY(%s)`` for a list, a cast where the type is not evident), which
the ORM's generated SQL does not always do. The cursor is Django's wrapper, so execute wrappers
see these statements as any other.

A prepared statement names its columns (no ``*``), so a migration that adds a column to a table
it reads leaves its result type, and so the prepared plan, valid in running processes.

Connection poolers in transaction mode (PgBouncer before 1.21) do not keep prepared
statements; set ``prepare_threshold`` to none there (``HMD_DATABASE_PREPARE_THRESHOLD=none``,
docs/ops/production.md), and these cursors bind on the server without preparing.
"""

from __future__ import annotations

import psycopg
from django.db.backends.base.base import BaseDatabaseWrapper


def prepared_cursor(connection: BaseDatabaseWrapper):
    """A Django cursor that binds on the server (PostgreSQL), so repeated statements are prepared.

    Elsewhere (SQLite), or while queries are logged, the connection's ordinary cursor.
    """
    if connection.vendor != "postgresql" or connection.queries_logged:
        return connection.cursor()

    # As BaseDatabaseWrapper._cursor does for its own cursors: a connection a database restart broke
    # is replaced (CONN_HEALTH_CHECKS) before the first statement of a request, not failed on.
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    with connection.wrap_database_errors:
        return connection._prepare_cursor(psycopg.Cursor(connection.connection))
