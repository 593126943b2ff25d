"""Prepared statements for the hot paths (keyvault/models/prepared.py), on real PostgreSQL."""

import psycopg
import pytest
from django.db import connection

from keyvault.models.prepared import prepared_cursor

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def _prepared_statements() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [statement for (statement,) in cursor.fetchall()]


@pytest.fixture(autouse=True)
def _postgres():
    if connection.vendor != "postgresql":
        pytest.fail("postgres-marked tests run only on PostgreSQL (scripts/test.sh deselects them elsewhere)")


def test_a_statement_is_prepared_on_its_connection_once_it_has_run_the_threshold_times():
    assert connection.settings_dict["OPTIONS"]["prepare_threshold"] == 5
    for run in range(1, 8):
        with prepared_cursor(connection) as cursor:
            cursor.execute("SELECT %s::int + 1", [run])
            assert cursor.fetchone() == (run + 1,)
        assert any("$1::int + 1" in statement for statement in _prepared_statements()) == (run > 5)


def test_without_a_threshold_nothing_is_prepared_and_the_statements_still_run():
    connection.close()
    connection.settings_dict["OPTIONS"]["prepare_threshold"] = None
    try:
        for run in range(8):
            with prepared_cursor(connection) as cursor:
                cursor.execute("SELECT %s::int * 2", [run])
                assert cursor.fetchone() == (run * 2,)
        assert not any("$1::int * 2" in statement for statement in _prepared_statements())
    finally:
        connection.close()
        connection.settings_dict["OPTIONS"]["prepare_threshold"] = 5


def test_while_queries_are_logged_the_statement_shows_as_it_ran(django_assert_num_queries):
    with django_assert_num_queries(1) as captured:
        with prepared_cursor(connection) as cursor:
            cursor.execute("SELECT %s::int + 40", [2])
            assert cursor.fetchone() == (42,)
    assert captured.captured_queries[0]["sql"] == "SELECT 2::int + 40"


def test_a_connection_the_server_dropped_is_replaced_before_the_next_requests_statement():
    with prepared_cursor(connection) as cursor:
        cursor.execute("SELECT %s::int", [1])
    backend = connection.connection.info.backend_pid
    db = connection.settings_dict
    with psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, dbname=db["NAME"], user=db["USER"],
                         autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [backend])
    connection.close_if_unusable_or_obsolete()  # what the next request's start does (request_started)
    with prepared_cursor(connection) as cursor:
        cursor.execute("SELECT %s::int", [2])
        assert cursor.fetchone() == (2,)
    assert connection.connection.info.backend_pid != backend
