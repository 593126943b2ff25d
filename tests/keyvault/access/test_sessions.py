"""Sessions a database read cannot use (keyvault/access/sessions.py): only an HMAC of the cookie is stored.

The attack from issue 12: copy the database (a world-readable SQLite file, a backup),
read ``django_session`` and present a row's key as the ``sessionid`` cookie.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from keyvault.access.sessions import SessionStore, stored_id
from keyvault.console.otp import TOTPDevice  # the model the console uses (django-otp's, or its encrypted successor)
from tests.keyvault import make_role_user
from tests.keyvault.web.test_hardening import PASSWORD, _isolated, token_for  # noqa: F401  (_isolated: autouse)

pytestmark = pytest.mark.django_db


def stored_session_keys() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT session_key FROM django_session")
        return [row[0] for row in cursor.fetchall()]


def verified_login(client, settings) -> None:
    """Password, then the TOTP code: a session that passed the second factor."""
    settings.REQUIRE_2FA = True
    user = make_role_user("operator", password=PASSWORD)
    device = TOTPDevice.objects.create(user=user, name="console", confirmed=True)
    assert client.post(reverse("admin:login"), {"username": "operator", "password": PASSWORD}).status_code == 302
    assert client.post(reverse("otp-verify"), {"token": token_for(device), "next": "/"}).status_code == 302


def test_a_database_read_gives_no_usable_session(client, settings):
    # given a Key operator signed in with password and second factor
    verified_login(client, settings)
    assert client.get(reverse("admin:index")).status_code == 200
    cookie = client.cookies[django_settings.SESSION_COOKIE_NAME].value

    # when someone who can read the database takes every stored session key
    stolen = stored_session_keys()

    # then the cookie value is not among them, and none of them opens the console
    assert stolen and cookie not in stolen
    for key in stolen:
        thief = Client()
        thief.cookies[django_settings.SESSION_COOKIE_NAME] = key
        response = thief.get(reverse("admin:index"))
        assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
    # and the real cookie still does
    assert client.get(reverse("admin:index")).status_code == 200


def test_logout_deletes_the_stored_session(client):
    # given a signed-in user
    make_role_user("auditor", password=PASSWORD)
    client.post(reverse("admin:login"), {"username": "auditor", "password": PASSWORD})
    cookie = client.cookies[django_settings.SESSION_COOKIE_NAME].value
    assert stored_id(cookie) in stored_session_keys()

    # when they sign out
    client.post(reverse("admin:logout"))

    # then the row is gone and the old cookie opens nothing
    assert stored_id(cookie) not in stored_session_keys()
    replay = Client()
    replay.cookies[django_settings.SESSION_COOKIE_NAME] = cookie
    assert replay.get(reverse("admin:index")).status_code == 302


def test_login_cycles_the_session_key(client):
    # given an anonymous session with data in it
    make_role_user("auditor", password=PASSWORD)
    session = client.session
    session["before"] = "login"
    session.save()
    before = session.session_key

    # when the user signs in
    client.post(reverse("admin:login"), {"username": "auditor", "password": PASSWORD})

    # then the session continues under a new key; the old one is stored nowhere
    after = client.cookies[django_settings.SESSION_COOKIE_NAME].value
    assert after != before
    assert client.session["before"] == "login"
    assert stored_id(before) not in stored_session_keys()


def test_an_expired_session_is_not_loaded():
    # given a stored session whose expiry date has passed
    store = SessionStore()
    store["user"] = "x"
    store.save()
    Session.objects.filter(session_key=stored_id(store.session_key)).update(
        expire_date=timezone.now() - timedelta(seconds=1))

    # when it is loaded by its cookie value
    loaded = SessionStore(store.session_key)

    # then it is empty and its key is dropped, so saving it makes a new one
    assert loaded.load() == {}
    assert loaded.session_key is None


def test_sessions_survive_a_secret_key_rotation_while_the_old_key_verifies():
    # given a session stored under the current key
    with override_settings(SECRET_KEY="old-" + "k" * 50, SECRET_KEY_FALLBACKS=[]):
        store = SessionStore()
        store["user"] = "alice"
        store.save()
        key = store.session_key

    # when the key rotates and the old one is a fallback, the session loads and moves to the new key
    with override_settings(SECRET_KEY="new-" + "k" * 50, SECRET_KEY_FALLBACKS=["old-" + "k" * 50]):
        assert SessionStore(key).load() == {"user": "alice"}
        moved = stored_id(key)
    assert stored_session_keys() == [moved]

    # then it still loads once the old key is retired
    with override_settings(SECRET_KEY="new-" + "k" * 50, SECRET_KEY_FALLBACKS=[]):
        assert SessionStore(key).load() == {"user": "alice"}


def test_a_session_never_used_during_the_rotation_ends_with_the_old_key():
    with override_settings(SECRET_KEY="old-" + "k" * 50, SECRET_KEY_FALLBACKS=[]):
        store = SessionStore()
        store["user"] = "bob"
        store.save()
    with override_settings(SECRET_KEY="new-" + "k" * 50, SECRET_KEY_FALLBACKS=[]):
        assert SessionStore(store.session_key).load() == {}
