"""Cookie-signing keyrings: rotation keeps old sessions alive for the grace period, retirement ends them."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from django.core import signing
from django.test import Client, override_settings
from django.utils import timezone

from keyvault.models import ManagedSecret
from rotation import services
from keyvault.secrets import keyring
from tests.rotation.executors.conftest import rotate, steps

pytestmark = pytest.mark.django_db
SETTINGS_FILE = str(Path(__file__).resolve().parents[3] / "keyvault" / "settings.py")


@pytest.fixture
def console_keyring(file_source, system_actor):
    file_source.write("console/keyring", keyring.dump(keyring.new_key(), []))
    secret = services.register_secret(name="console-cookies", secret_type="cookie_signing", source="file",
                                      path="console/keyring", owner="secops@example.com", actor=system_actor)
    services.update_secret_policy(secret, actor=system_actor, grace_period=timedelta(hours=12))
    return secret


def keys_in(source, path="console/keyring"):
    return keyring.parse(source.read(path).value)


def signed_cookie_client(user):
    client = Client()
    client.force_login(user)
    return client


def test_session_signed_with_old_key_survives_rotation_and_dies_at_retirement(
    console_keyring, file_source, system_actor, django_user_model
):
    # given: two staff users logged in to the console with sessions signed by the current key
    old_key, _ = keys_in(file_source)
    user_a = django_user_model.objects.create_user("alice", password="correct horse battery", is_staff=True)
    user_b = django_user_model.objects.create_user("bob", password="correct horse battery", is_staff=True)
    sessions = {"SESSION_ENGINE": "django.contrib.sessions.backends.signed_cookies"}
    with override_settings(SECRET_KEY=old_key, SECRET_KEY_FALLBACKS=[], **sessions):
        alice, bob = signed_cookie_client(user_a), signed_cookie_client(user_b)
        assert alice.get("/").status_code == 200

    # when: the keyring is rotated (as the console would after reloading it)
    t0 = timezone.now()
    run = rotate(console_keyring, actor=system_actor, now=t0)
    new_key, previous = keys_in(file_source)

    # then: the new key signs, the old one only verifies, and Alice's old session still works
    assert run.state == "retiring" and run.retire_after == t0 + timedelta(hours=12)
    assert new_key != old_key and previous == [old_key] and len(new_key) == 43
    with override_settings(SECRET_KEY=new_key, SECRET_KEY_FALLBACKS=previous, **sessions):
        assert alice.get("/").status_code == 200  # re-signed with the new key on the way

    # when: the grace period passes and the run retires the old key
    services.execute_run(run.pk, now=t0 + timedelta(hours=12, seconds=1))
    run.refresh_from_db()
    current, previous = keys_in(file_source)

    # then: sessions still signed with the old key (Bob never came back) are logged out; Alice's is fine
    assert run.state == "completed" and current == new_key and previous == []
    with override_settings(SECRET_KEY=current, SECRET_KEY_FALLBACKS=previous, **sessions):
        assert alice.get("/").status_code == 200
        response = bob.get("/")
        assert response.status_code == 302 and "/login/" in response["Location"]
    assert steps(run)["retire"] == "done" and steps(run)["verify.sign"] == "done"


def test_signed_values_follow_the_keyring(console_keyring, file_source, system_actor):
    # given: a value signed under the current key
    old_key, _ = keys_in(file_source)
    token = signing.dumps({"user": 7}, key=old_key)
    t0 = timezone.now()

    # when: rotated, then retired
    run = rotate(console_keyring, actor=system_actor, now=t0)
    new_key, previous = keys_in(file_source)
    during = signing.loads(token, key=new_key, fallback_keys=previous)
    services.execute_run(run.pk, now=t0 + timedelta(days=1))
    current, previous = keys_in(file_source)

    # then: it verified through the fallbacks during the grace period, and no longer after
    assert during == {"user": 7}
    with pytest.raises(signing.BadSignature):
        signing.loads(token, key=current, fallback_keys=previous)


def test_emergency_rotation_retires_the_old_key_at_once(console_keyring, file_source, system_actor):
    old_key, _ = keys_in(file_source)
    run = rotate(console_keyring, actor=system_actor, kind="emergency", incident_ref="INC-7")
    current, previous = keys_in(file_source)
    assert run.state == "completed"
    assert current != old_key and previous == []


def test_rollback_restores_the_previous_keyring(console_keyring, file_source, system_actor):
    old_key, _ = keys_in(file_source)
    run = rotate(console_keyring, actor=system_actor)
    services.rollback(run, actor=system_actor, reason="app cannot read the new keyring")
    run.refresh_from_db()
    assert run.state == "rolled_back"
    assert keys_in(file_source)[0] == old_key
    assert steps(run)["rollback.restore"] == "done"


def test_a_keyring_that_does_not_parse_fails_the_run_and_is_left_alone(file_source, system_actor, mailoutbox):
    # given: a cookie secret whose stored value is not a keyring
    file_source.write("broken/keyring", "not json")
    secret = services.register_secret(name="broken", secret_type="cookie_signing", source="file",
                                      path="broken/keyring", owner="secops@example.com", actor=system_actor)

    # when
    run = rotate(secret, actor=system_actor)

    # then: failed with the reason, value untouched, status failed, owner told
    secret.refresh_from_db()
    assert run.state == "failed" and "keyring is not JSON" in run.last_error
    assert file_source.read("broken/keyring").value == "not json"
    assert secret.status == ManagedSecret.Status.FAILED
    assert [m.to for m in mailoutbox] == [["secops@example.com"]] and "failed" in mailoutbox[0].subject


def test_settings_read_secret_key_and_fallbacks_from_a_keyring(tmp_path, monkeypatch):
    # given: a keyring file as the file source writes it
    path = tmp_path / "keyring"
    path.write_text(json.dumps({"current": "k-new", "previous": ["k-old"]}) + "\n")
    monkeypatch.setenv("HMD_SECRET_KEY_KEYRING_FILE", str(path))
    monkeypatch.setenv("HMD_DATA_DIR", str(tmp_path))

    # when: the settings module is evaluated afresh
    import importlib.util

    spec = importlib.util.spec_from_file_location("kv_settings_probe", SETTINGS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    # then
    assert module.SECRET_KEY == "k-new" and module.SECRET_KEY_FALLBACKS == ["k-old"]


def test_a_broken_keyring_stops_settings_with_a_clear_error(tmp_path, monkeypatch):
    from django.core.exceptions import ImproperlyConfigured

    monkeypatch.setenv("HMD_SECRET_KEY_KEYRING", '{"previous": []}')
    monkeypatch.setenv("HMD_DATA_DIR", str(tmp_path))
    import importlib.util

    spec = importlib.util.spec_from_file_location("kv_settings_probe2", SETTINGS_FILE)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImproperlyConfigured, match="HMD_SECRET_KEY_KEYRING: keyring needs"):
        spec.loader.exec_module(module)
