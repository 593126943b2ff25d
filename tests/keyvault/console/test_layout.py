"""Django-admin leftovers gone: one "Sign-in security" group, list titles without "Select … to change",
the user's own audit events instead of "Recent actions", and the KEK actions grouped."""

from __future__ import annotations

import pytest
from django.urls import reverse

from keyvault.audit import Actor, events
from keyvault.console.admin_views import ActionLink, group_actions
from tests.keyvault import build_world, make_role_user, use_temp_keyring

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(settings, tmp_path):
    use_temp_keyring(settings, tmp_path)
    return build_world()


def test_axes_and_totp_are_one_sign_in_security_group(admin_client):
    app_list = admin_client.get(reverse("admin:index")).context["app_list"]
    names = [app["name"] for app in app_list]
    assert "Axes" not in names and "Otp_Totp" not in names
    assert names[-1] == "Sign-in security"
    assert {model["object_name"] for model in app_list[-1]["models"]} >= {"AccessAttempt", "AccessLog"}


@pytest.mark.parametrize("url_name, title", [
    ("admin:keyvault_keyencryptionkey_changelist", "Key-encryption keys"),
    ("admin:keyvault_auditevent_changelist", "Audit events"),
    ("admin:auth_user_changelist", "Users"),
])
def test_list_pages_are_titled_by_what_they_list(admin_client, url_name, title):
    page = admin_client.get(reverse(url_name))
    assert page.context["title"] == title
    assert b"to change</h1>" not in page.content and b"to view</h1>" not in page.content


def test_the_home_page_shows_the_users_own_recent_audit_events(world, client):
    operator = make_role_user("operator")
    events.kek_enabled(world.bravo, actor=Actor.user(operator))
    events.kek_enabled(world.bravo, actor=Actor.system("someone-else"))
    client.force_login(operator)
    page = client.get(reverse("admin:index")).content.decode()
    assert 'id="kv-recent-audit"' in page and "Recent actions" not in page
    panel = page[page.index('id="kv-recent-audit"'):]
    assert "KEK enabled" in panel and panel.count("<li") == 1  # not the event by someone else


def test_kek_actions_are_one_primary_and_a_menu():
    links = [ActionLink("Rotate now", "/r"), ActionLink("Emergency rotate", "/e", True),
             ActionLink("Migrate", "/m"), ActionLink("Disable", "/d", True)]
    grouped = group_actions(links)
    assert grouped.primary.label == "Rotate now"
    assert [link.label for link in grouped.more] == ["Migrate"]
    assert [link.label for link in grouped.danger] == ["Emergency rotate", "Disable"]
    assert group_actions([ActionLink("Disable", "/d", True)]).primary is None
