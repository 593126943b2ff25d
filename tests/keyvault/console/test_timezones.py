"""Dates: one format everywhere, zone named, UTC by default, per-user zone (page and command)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.core.management import call_command
from django.template import Context, Template
from django.urls import reverse
from django.utils import timezone

from keyvault.audit import Actor
from keyvault.console import timezones
from keyvault.models import AuditEvent
from keyvault.exceptions import InvalidPreference
from tests.keyvault import build_world, make_role_user, use_temp_keyring

pytestmark = pytest.mark.django_db
MOMENT = datetime(2026, 7, 1, 12, 30, 5, tzinfo=UTC)


def test_the_one_format_names_the_zone():
    assert timezones.format_when(MOMENT, zone=UTC) == "2026-07-01 12:30:05 UTC"
    assert timezones.format_when(MOMENT, zone=timezones._zone("Europe/Berlin")) == "2026-07-01 14:30:05 CEST"
    assert timezones.format_when(None) == "—"


def test_django_shows_dates_in_the_same_format():
    with timezone.override(timezones._zone("Europe/Berlin")):
        assert Template("{{ moment }}").render(Context({"moment": MOMENT})) == "2026-07-01 14:30:05 CEST"
        assert Template("{% load kv_time %}{{ moment|when }}").render(Context({"moment": MOMENT})) == (
            "2026-07-01 14:30:05 CEST")


def test_a_user_sees_utc_until_they_choose_a_zone(client):
    user = make_role_user("auditor")
    client.force_login(user)
    assert timezones.time_zone_of(user) == "UTC"
    assert b"UTC" in client.get(reverse("console-preferences")).content

    response = client.post(reverse("console-preferences"), {"time_zone": "Asia/Tokyo"})

    assert response.status_code == 302 and timezones.time_zone_of(user) == "Asia/Tokyo"
    assert b"JST" in client.get(reverse("console-preferences")).content
    assert timezones.time_zone_of(make_role_user("operator")) == "UTC"  # one user's choice only


def test_an_unknown_zone_is_refused_and_nothing_changes(client):
    user = make_role_user("auditor")
    with pytest.raises(InvalidPreference):
        timezones.set_time_zone(user, time_zone="Mars/Olympus", actor=Actor.user(user))
    client.force_login(user)
    response = client.post(reverse("console-preferences"), {"time_zone": "Mars/Olympus"})
    assert response.status_code == 200 and b"errorlist" in response.content
    assert timezones.time_zone_of(user) == "UTC"
    assert not AuditEvent.objects.filter(action="user.preference_changed").exists()


def _preference_events():
    return [(e.actor, e.target_type, e.target_id, e.details) for e in
            AuditEvent.objects.filter(action="user.preference_changed").order_by("sequence")]


def test_a_zone_change_on_the_page_is_audited_once_per_change(client):
    user = make_role_user("auditor")
    client.force_login(user)

    client.post(reverse("console-preferences"), {"time_zone": "Asia/Tokyo"})
    client.post(reverse("console-preferences"), {"time_zone": "Asia/Tokyo"})  # the same again: no change

    assert _preference_events() == [("user:auditor", "user", "auditor",
                                     {"setting": "time_zone", "before": "UTC", "after": "Asia/Tokyo"})]


def test_a_zone_change_on_the_command_line_is_audited_with_who_ran_it():
    make_role_user("operator")
    call_command("preferences", "--user", "operator", "--time-zone", "Europe/Paris")
    call_command("preferences", "--user", "operator", "--time-zone", "UTC")

    events = _preference_events()
    assert [(target, details["before"], details["after"]) for _, _, target, details in events] == [
        ("operator", "UTC", "Europe/Paris"), ("operator", "Europe/Paris", "UTC")]
    assert all(actor.startswith("system:cli:") for actor, *_ in events)


def test_list_pages_show_times_in_the_users_zone(client, settings, tmp_path):
    use_temp_keyring(settings, tmp_path)
    build_world()
    user = make_role_user("auditor")
    timezones.set_time_zone(user, time_zone="America/New_York", actor=Actor.user(user))
    client.force_login(user)
    page = client.get(reverse("admin:keyvault_auditevent_changelist")).content.decode()
    assert " EST</time>" in page or " EDT</time>" in page


def test_the_command_sets_the_same_preference(capsys):
    user = make_role_user("operator")
    call_command("preferences", "--user", "operator", "--time-zone", "Europe/Paris")
    assert timezones.time_zone_of(user) == "Europe/Paris"
    assert capsys.readouterr().out.strip() == "time zone: Europe/Paris"
