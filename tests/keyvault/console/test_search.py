"""Global search: one term across KEKs, data keys (id, fingerprint), runs, secrets and request ids; by permission."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.urls import reverse

from keyvault.audit import Actor, events
from keyvault.console import search
from keyvault.exceptions import InvalidSearch
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
