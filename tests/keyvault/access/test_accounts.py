"""Issue 12 #4: every change to users, groups, permissions, 2FA devices and SIEM consumers is in the chain.

Each path is tried: the console (Django's user and group admin, our device admin), the
services, Django's ``createsuperuser``/``changepassword``, and plain ORM writes as a shell
would make them. Each change must give exactly the expected event, with before and after,
and never a password hash or a secret.
"""

from __future__ import annotations

import getpass

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.core.management import call_command
from django.urls import reverse

from keyvault import audit
from keyvault.access import accounts
from keyvault.access.roles import AUDITORS, KEY_ADMINISTRATORS, KEY_OPERATORS
from keyvault.audit import Action, Actor, siem
from keyvault.models import AuditEvent, TOTPDevice
from tests.keyvault import use_temp_keyring

pytestmark = pytest.mark.django_db
PASSWORD = "correct horse battery staple"
ACCOUNT_ACTIONS = [Action.USER_CREATED, Action.USER_CHANGED, Action.USER_PASSWORD_CHANGED, Action.USER_DELETED,
                   Action.GROUP_CREATED, Action.GROUP_CHANGED, Action.GROUP_DELETED, Action.DEVICE_CREATED,
                   Action.DEVICE_CONFIRMED, Action.DEVICE_DELETED, Action.DEVICE_THROTTLE_RESET,
                   Action.SIEM_CONSUMER_CREATED, Action.SIEM_CONSUMER_CHANGED]


@pytest.fixture(autouse=True)
def _isolated(settings, tmp_path):
    use_temp_keyring(settings, tmp_path)
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # tests only


@pytest.fixture
def root(client):
    """A superuser in the console (created, like every account, through the service)."""
    user = accounts.create_user(username="root", actor=Actor.system("tests"), password=PASSWORD, is_superuser=True)
    client.force_login(user)
    return user


@pytest.fixture
def bob():
    return accounts.create_user(username="bob", actor=Actor.system("tests"), password=PASSWORD,
                                groups=[KEY_OPERATORS])


def events_after(sequence: int) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(sequence__gt=sequence, action__in=ACCOUNT_ACTIONS).order_by("sequence"))


def head() -> int:
    return audit.chain_position()[0]


def user_form(user: User, **overrides) -> dict:
    """The user admin's change form as the browser would post it."""
    data = {"username": user.username, "first_name": user.first_name, "last_name": user.last_name,
            "email": user.email, "is_active": "on" if user.is_active else "", "is_staff": "on" if user.is_staff else "",
            "is_superuser": "on" if user.is_superuser else "",
            "groups": [g.pk for g in user.groups.all()], "user_permissions": [p.pk for p in user.user_permissions.all()],
            "last_login_0": "", "last_login_1": "", "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"}
    data.update(overrides)
    return {key: value for key, value in data.items() if value != ""}


# -- the console ------------------------------------------------------------------------------


def test_console_making_a_user_superuser_and_key_administrator_is_one_event_with_before_and_after(client, root, bob):
    # given an operator and the position of the chain
    start = head()
    admins = Group.objects.get(name=KEY_ADMINISTRATORS)

    # when the superuser makes them superuser and adds Key administrators in one form
    response = client.post(reverse("admin:auth_user_change", args=[bob.pk]), user_form(
        bob, is_superuser="on", groups=[g.pk for g in bob.groups.all()] + [admins.pk]))

    # then exactly one user.changed event names both changes, by the superuser
    assert response.status_code == 302, response.content[:2000]
    [event] = events_after(start)
    assert event.action == Action.USER_CHANGED and event.actor == "user:root"
    assert (event.target_type, event.target_id) == ("user", "bob")
    assert event.details["changed"] == ["groups", "is_superuser"]
    assert event.details["before"] == {"groups": [KEY_OPERATORS], "is_superuser": False}
    assert event.details["after"] == {"groups": sorted([KEY_ADMINISTRATORS, KEY_OPERATORS]), "is_superuser": True}


def test_console_creating_a_user_is_one_event_without_the_password(client, root):
    start = head()

    response = client.post(reverse("admin:auth_user_add"), {
        "username": "frank", "password1": "a long enough passphrase 9", "password2": "a long enough passphrase 9",
        "usable_password": "true"})

    assert response.status_code == 302
    [event] = events_after(start)
    assert (event.action, event.target_id, event.actor) == (Action.USER_CREATED, "frank", "user:root")
    assert event.details["before"] is None and event.details["after"]["is_superuser"] is False
    assert event.details["after"]["password"] == audit.hmac_value(User.objects.get(username="frank").password)
    assert "passphrase" not in str(event.details)


def test_a_privilege_change_reaches_the_siem_feed(client, bob):
    # given a SIEM consumer that has read everything so far
    consumer, token = siem.create_consumer(name="splunk", actor=Actor.system("tests"))
    start = head()

    # when bob is made superuser
    accounts.update_user(bob, actor=Actor.system("tests"), is_superuser=True)

    # then the collector's next page carries the event, chained
    page = client.get("/siem/events", {"after": start}, HTTP_AUTHORIZATION=f"Bearer {token}").json()
    [event] = page["events"]
    assert event["action"] == "user.changed" and event["target_id"] == "bob"
    assert event["details"]["after"] == {"is_superuser": True}


def test_console_adding_a_member_from_the_group_page_is_a_user_change(client, root, bob):
    # given the Key administrators group without bob
    start = head()
    admins = Group.objects.get(name=KEY_ADMINISTRATORS)

    # when the superuser adds bob on the group's page
    response = client.post(reverse("admin:auth_group_change", args=[admins.pk]), {
        "name": admins.name, "permissions": [p.pk for p in admins.permissions.all()], "members": [bob.pk]})

    # then bob's groups changed, in one event by the superuser; the group itself did not change
    assert response.status_code == 302
    [event] = events_after(start)
    assert (event.action, event.target_id, event.actor) == (Action.USER_CHANGED, "bob", "user:root")
    assert event.details["before"] == {"groups": [KEY_OPERATORS]}
    assert event.details["after"] == {"groups": sorted([KEY_ADMINISTRATORS, KEY_OPERATORS])}


def test_console_group_create_permissions_rename_and_delete(client, root):
    start = head()
    unwrap = Permission.objects.get(codename="unwrap_datakey")

    # when a group is created with a permission, renamed, given another, and deleted
    client.post(reverse("admin:auth_group_add"), {"name": "Unwrappers", "permissions": [unwrap.pk]})
    group = Group.objects.get(name="Unwrappers")
    view = Permission.objects.get(codename="view_datakey")
    client.post(reverse("admin:auth_group_change", args=[group.pk]),
                {"name": "Data readers", "permissions": [unwrap.pk, view.pk]})
    client.post(reverse("admin:auth_group_delete", args=[group.pk]), {"post": "yes"})

    # then three events, each with what it was and what it became
    created, changed, deleted = events_after(start)
    assert created.action == Action.GROUP_CREATED and created.target_id == "Unwrappers"
    assert created.details == {"before": None, "after": {"name": "Unwrappers", "permissions": ["keyvault.unwrap_datakey"]}}
    assert changed.action == Action.GROUP_CHANGED and changed.actor == "user:root"
    assert changed.details["before"] == {"name": "Unwrappers", "permissions": ["keyvault.unwrap_datakey"]}
    assert changed.details["after"] == {"name": "Data readers",
                                        "permissions": ["keyvault.unwrap_datakey", "keyvault.view_datakey"]}
    assert deleted.action == Action.GROUP_DELETED and deleted.target_id == "Data readers"
    assert deleted.details["before"]["permissions"] == ["keyvault.unwrap_datakey", "keyvault.view_datakey"]
    assert deleted.details["after"] is None


def test_console_password_change_is_recorded_without_the_hash(client, root, bob):
    start = head()
    old_hash = bob.password

    response = client.post(reverse("admin:auth_user_password_change", args=[bob.pk]),
                           {"password1": "a new long passphrase 42", "password2": "a new long passphrase 42",
                            "usable_password": "true"})

    assert response.status_code == 302
    bob.refresh_from_db()
    [event] = events_after(start)
    assert (event.action, event.target_id, event.actor) == (Action.USER_PASSWORD_CHANGED, "bob", "user:root")
    assert event.details["before"] == {"password": audit.hmac_value(old_hash)}
    assert event.details["after"] == {"password": audit.hmac_value(bob.password)}
    assert old_hash not in str(event.details) and bob.password not in str(event.details)


def test_console_deleting_a_user_records_what_they_could_do_and_their_device(client, root, bob):
    accounts.create_device(bob, actor=Actor.system("tests"), confirmed=True)
    start = head()

    response = client.post(reverse("admin:auth_user_delete", args=[bob.pk]), {"post": "yes"})

    assert response.status_code == 302 and not User.objects.filter(username="bob").exists()
    actions = {event.action: event for event in events_after(start)}
    assert set(actions) == {Action.USER_DELETED, Action.DEVICE_DELETED}
    deleted = actions[Action.USER_DELETED]
    assert deleted.actor == "user:root" and deleted.details["before"]["groups"] == [KEY_OPERATORS]
    assert actions[Action.DEVICE_DELETED].target_id == "bob"


def test_console_device_delete_and_reset_throttle_are_audited(client, root, bob):
    device = accounts.create_device(bob, actor=Actor.system("tests"), confirmed=True)
    TOTPDevice.objects.filter(pk=device.pk).update(throttling_failure_count=9)
    start = head()

    reset = client.post(reverse("admin:keyvault_totpdevice_changelist"),
                        {"action": "reset_throttle", "_selected_action": [device.pk]})
    deleted = client.post(reverse("admin:keyvault_totpdevice_delete", args=[device.pk]), {"post": "yes"})

    assert reset.status_code == 302 and deleted.status_code == 302
    throttle, gone = events_after(start)
    assert (throttle.action, throttle.actor, throttle.target_id) == (Action.DEVICE_THROTTLE_RESET, "user:root", "bob")
    assert throttle.details["before"] == {"failures": 9} and throttle.details["after"] == {"failures": 0}
    assert (gone.action, gone.actor) == (Action.DEVICE_DELETED, "user:root")
    assert gone.details["before"]["confirmed"] is True and not TOTPDevice.objects.filter(pk=device.pk).exists()


# -- services -----------------------------------------------------------------------------------


def test_services_record_one_event_per_change_with_the_actor():
    actor = Actor.system("tests")
    start = head()

    user = accounts.create_user(username="carol", actor=actor, password=PASSWORD, groups=[AUDITORS])
    accounts.update_user(user, actor=actor, is_active=False)
    accounts.set_user_groups(user, actor=actor, groups=[AUDITORS, KEY_OPERATORS])
    accounts.set_user_permissions(user, actor=actor, permissions=["keyvault.unwrap_datakey"])
    accounts.set_password(user, actor=actor, password=None)
    accounts.delete_user(user, actor=actor)

    events = events_after(start)
    assert [e.action for e in events] == [Action.USER_CREATED, Action.USER_CHANGED, Action.USER_CHANGED,
                                          Action.USER_CHANGED, Action.USER_PASSWORD_CHANGED, Action.USER_DELETED]
    assert {e.actor for e in events} == {"system:tests"}
    created = events[0].details["after"]
    assert created["groups"] == [AUDITORS] and created["is_superuser"] is False
    assert created["password"].startswith("hmac-sha256:")
    assert events[1].details["before"] == {"is_active": True} and events[1].details["after"] == {"is_active": False}
    assert events[2].details["after"] == {"groups": [AUDITORS, KEY_OPERATORS]}
    assert events[3].details["after"] == {"user_permissions": ["keyvault.unwrap_datakey"]}
    assert events[4].details["after"] == {"password": "unusable"}


def test_devices_created_confirmed_and_reset_through_the_services():
    actor = Actor.system("tests")
    user = accounts.create_user(username="dave", actor=actor)
    start = head()

    device = accounts.create_device(user, actor=actor)
    accounts.confirm_device(device, actor=actor)
    assert accounts.reset_devices(user, actor=actor) == 1

    created, confirmed, deleted = events_after(start)
    assert created.action == Action.DEVICE_CREATED and created.details["after"]["confirmed"] is False
    assert confirmed.action == Action.DEVICE_CONFIRMED
    assert (confirmed.details["before"], confirmed.details["after"]) == ({"confirmed": False}, {"confirmed": True})
    assert deleted.action == Action.DEVICE_DELETED
    assert device.key not in str([created.details, confirmed.details, deleted.details])


def test_siem_consumers_created_and_deactivated_with_before_and_after():
    start = head()

    consumer, token = siem.create_consumer(name="elastic", actor=Actor.system("tests"))
    siem.set_active(consumer, active=False, actor=Actor.system("tests"))
    siem.set_active(consumer, active=False, actor=Actor.system("tests"))  # no change, no event

    created, changed = events_after(start)
    assert created.action == Action.SIEM_CONSUMER_CREATED and created.details["after"]["active"] is True
    assert changed.details == {"changed": ["active"], "before": {"active": True}, "after": {"active": False}}
    assert token not in str(created.details) and consumer.token_hash not in str(created.details)


# -- paths around the services ---------------------------------------------------------------------


def test_a_shell_write_is_still_recorded_as_unattributed(bob):
    start = head()

    # when someone in `manage.py shell` makes bob superuser and adds him to Key administrators by the ORM
    bob.is_superuser = True
    bob.save()
    Group.objects.get(name=KEY_ADMINISTRATORS).user_set.add(bob)

    flag, group = events_after(start)
    assert flag.actor == group.actor == "system:unattributed"
    assert flag.details["after"] == {"is_superuser": True}
    assert group.details["after"] == {"groups": sorted([KEY_ADMINISTRATORS, KEY_OPERATORS])}


def test_createsuperuser_and_changepassword_are_recorded_as_the_cli_user(monkeypatch):
    start = head()
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", PASSWORD)

    call_command("createsuperuser", "--noinput", "--username", "eve", "--email", "eve@example.org")
    from django.contrib.auth.management.commands import changepassword

    monkeypatch.setattr(changepassword.getpass, "getpass", lambda prompt="": "another long passphrase 7")
    call_command("changepassword", "eve")

    created, password = events_after(start)
    cli = f"system:cli:{getpass.getuser()}"
    assert (created.action, created.actor, created.target_id) == (Action.USER_CREATED, cli, "eve")
    assert created.details["after"]["is_superuser"] is True and created.details["after"]["is_staff"] is True
    assert (password.action, password.actor) == (Action.USER_PASSWORD_CHANGED, cli)
    assert User.objects.get(username="eve").password not in str(password.details)


def test_logins_and_hash_upgrades_are_not_privilege_changes(client, bob, settings):
    start = head()
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher",
                                 "django.contrib.auth.hashers.MD5PasswordHasher"]

    # when bob logs in (last_login moves, and his MD5 hash is upgraded to PBKDF2)
    response = client.post(reverse("admin:login"), {"username": "bob", "password": PASSWORD, "next": "/"})
    assert response.status_code == 302

    bob.refresh_from_db()
    assert bob.password.startswith("pbkdf2_") and bob.last_login is not None
    assert events_after(start) == []


def test_a_failed_service_leaves_nothing(bob):
    start = head()

    with pytest.raises(accounts.AccountError):
        accounts.set_user_groups(bob, actor=Actor.system("tests"), groups=["No such group"])

    assert events_after(start) == [] and list(bob.groups.values_list("name", flat=True)) == [KEY_OPERATORS]


# -- migration 0009: devices from django-otp's plaintext table ----------------------------------------


def test_legacy_plaintext_devices_are_sealed_and_their_table_dropped(bob):
    # given django-otp's old table with bob's device, its secret in clear
    import importlib

    from django.apps import apps
    from django.db import connection

    migration = importlib.import_module("keyvault.migrations.0009_totp_device_encrypted")
    secret = "3132333435363738393031323334353637383930"
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE otp_totp_totpdevice (id integer PRIMARY KEY, user_id integer, name varchar(64), "
            "confirmed boolean, throttling_failure_timestamp timestamp NULL, throttling_failure_count integer, "
            "created_at timestamp NULL, last_used_at timestamp NULL, key varchar(80), step smallint, t0 bigint, "
            "digits smallint, tolerance smallint, drift smallint, last_t bigint)")
        cursor.execute("INSERT INTO otp_totp_totpdevice VALUES (7, %s, 'phone', %s, NULL, 0, NULL, NULL, %s, "
                       "30, 0, 6, 1, 0, 55)", [bob.pk, True, secret])

    class Editor:  # what the migration uses of a schema editor
        def __init__(self):
            self.connection = connection

        def execute(self, sql):
            with connection.cursor() as cursor:
                cursor.execute(sql)

    # when the data migration runs
    migration.encrypt_legacy_devices(apps, Editor())

    # then bob's device is ours, same secret and state, stored sealed; the plaintext table is gone
    device = TOTPDevice.objects.get(user=bob)
    assert (device.key, device.name, device.confirmed, device.last_t) == (secret, "phone", True, 55)
    with connection.cursor() as cursor:
        cursor.execute("SELECT key FROM keyvault_totpdevice WHERE id = %s", [device.pk])
        stored = bytes(cursor.fetchone()[0])
    assert secret.encode() not in stored and bytes.fromhex(secret) not in stored
    assert "otp_totp_totpdevice" not in connection.introspection.table_names()
