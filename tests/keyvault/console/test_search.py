"""Global search: one term across KEKs, data keys (id, fingerprint), runs, secrets and request ids; by permission."""

from __future__ import annotations

import importlib

import pytest
from django.apps import apps as django_apps
from django.core.management import call_command
from django.db import connections
from django.urls import reverse

from keyvault.audit import Actor, events
from keyvault.console import search
from keyvault.exceptions import InvalidSearch
from keyvault.keys import services as key_services
from keyvault.models import DataKey, wrapped_key_fingerprint
from rotation import services as rotation
from tests.keyvault import build_world, make_role_user, use_temp_keyring

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(settings, tmp_path):
    use_temp_keyring(settings, tmp_path)
    return build_world()


def _labels(results, section):
    return [hit.label for hit in results.sections[section]]


def test_a_kek_is_found_by_part_of_its_name(world):
    results = search.search("lph")
    assert _labels(results, "Key-encryption keys") == ["alpha"]
    assert results.sections["Data keys"] == []


def test_a_data_key_is_found_by_id_and_by_the_fingerprint_the_console_shows(world):
    key = world.data_key
    by_id = search.search(str(key.pk))
    assert _labels(by_id, "Data keys") == [f"data key #{key.pk}"]
    by_fingerprint = search.search(key.fingerprint.upper())
    assert _labels(by_fingerprint, "Data keys") == [f"data key #{key.pk}"]
    assert key.fingerprint in by_fingerprint.sections["Data keys"][0].detail
    assert search.search("0" * 16).sections["Data keys"] == []


def test_a_run_is_found_by_number_and_incident_reference(world):
    run = rotation.start_run(kek=world.alpha, actor=Actor.system("tests"), reason="quarterly",
                             incident_ref="INC-4242")
    assert _labels(search.search(f"#{run.pk}"), "Rotation runs") == [f"run #{run.pk}"]
    assert _labels(search.search("INC-4242"), "Rotation runs") == [f"run #{run.pk}"]


def test_audit_events_are_found_by_request_id(world):
    actor = Actor(name="user:someone", request_id="req-7f3a9")
    events.kek_enabled(world.bravo, actor=actor)
    hits = search.search("req-7f3a9").sections["Audit events by request id"]
    assert len(hits) == 1 and hits[0].label.endswith("KEK enabled")


def test_each_kind_is_searched_only_for_who_may_view_it(world):
    operator = make_role_user("operator")
    results = search.search("alpha", user=operator)
    assert set(results.sections) == {title for title, permission in (
        ("Key-encryption keys", "keyvault.view_keyencryptionkey"), ("Data keys", "keyvault.view_datakey"),
        ("Rotation runs", "rotation.view_rotationrun"), ("Managed secrets", "keyvault.view_managedsecret"),
        ("Audit events by request id", "keyvault.view_auditevent")) if operator.has_perm(permission)}


@pytest.mark.parametrize("term", ["", "   ", "x" * (search.MAX_TERM + 1)])
def test_an_empty_or_overlong_term_is_a_typed_error(term):
    with pytest.raises(InvalidSearch):
        search.search(term)


def test_odd_digits_are_not_taken_for_an_id(world):
    results = search.search("²")
    assert results.sections["Data keys"] == [] and results.sections["Rotation runs"] == []


def test_the_page_and_the_command_show_the_same_hits(world, client, capsys):
    client.force_login(make_role_user("auditor"))
    page = client.get(reverse("console-search"), {"q": "alpha"})
    assert page.status_code == 200
    assert b'class="kv-search-hit"' in page.content and b">alpha</a>" in page.content
    assert client.get(reverse("console-search"), {"q": "x" * 300}).status_code == 400

    call_command("search", "alpha")
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("KEK\talpha\t")


def test_a_data_key_is_found_by_the_first_digits_of_its_fingerprint(world):
    key = world.data_key
    prefix = key.fingerprint[:search.MIN_FINGERPRINT_PREFIX]
    assert f"data key #{key.pk}" in _labels(search.search(prefix.upper()), "Data keys")
    # fewer digits than the minimum are not a fingerprint search (too many keys would match)
    short = key.fingerprint[:search.MIN_FINGERPRINT_PREFIX - 1]
    assert all(hit.label != f"data key #{key.pk}" or short == str(key.pk)
               for hit in search.search(short).sections["Data keys"])


def test_the_displayed_fingerprint_is_the_stored_one_of_the_wrapped_bytes(world):
    key = DataKey.objects.get(pk=world.data_key.pk)
    assert key.fingerprint == wrapped_key_fingerprint(key.wrapped_key) != ""


def test_a_rewrap_moves_the_search_to_the_new_fingerprint(world):
    key = world.data_key
    old = DataKey.objects.get(pk=key.pk).fingerprint
    key_services.rotate_kek_version(key.kek, actor=Actor.system("tests"), reason="test")
    rewrapped = key_services.rewrap_data_key(key, actor=Actor.system("tests"))
    stored = DataKey.objects.get(pk=key.pk)
    assert stored.fingerprint == rewrapped.fingerprint == wrapped_key_fingerprint(stored.wrapped_key) != old
    assert _labels(search.search(stored.fingerprint), "Data keys") == [f"data key #{key.pk}"]
    assert search.search(old).sections["Data keys"] == []


def test_the_migration_fills_fingerprints_of_existing_rows(world):
    key = world.data_key
    DataKey.objects.filter(pk=key.pk).update(fingerprint="")

    class Editor:  # what the migration reads of a schema editor, over the test's own connection
        connection = connections["default"]

        def execute(self, sql, params=()):
            with self.connection.cursor() as cursor:
                cursor.execute(sql, params)

    fill = importlib.import_module("keyvault.migrations.0019_datakey_fingerprint").fill_fingerprints
    fill(django_apps, Editor())
    stored = DataKey.objects.get(pk=key.pk)
    assert stored.fingerprint == wrapped_key_fingerprint(stored.wrapped_key)


@pytest.mark.postgres
def test_on_postgresql_a_fingerprint_prefix_search_uses_the_index(world):
    with connections["default"].cursor() as cursor:
        cursor.execute("ANALYZE keyvault_datakey")  # the statistics earlier tests left behind must not decide
        cursor.execute("SET LOCAL enable_seqscan = off")
        # No ordering: on a test-sized table the planner would rather walk the primary key backwards
        # for ORDER BY -id and filter; the question here is whether a prefix LIKE can use the index at all.
        sql, params = DataKey.objects.filter(fingerprint__startswith="abcdef").order_by().query.sql_with_params()
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "datakey_fingerprint" in plan
