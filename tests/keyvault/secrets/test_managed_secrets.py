"""Managed secrets: the inventory model, expiry/overdue reminders, notifiers and the CLI."""

from __future__ import annotations

import json
import re
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.db import IntegrityError, transaction
from django.utils import timezone

from keyvault.models import AuditEvent, ManagedSecret
from keyvault.ops import notify
from rotation import services
from rotation.exceptions import RunAlreadyActive
from keyvault.secrets import keyring
from rotation.models import RotationPolicy, RotationRun
from tests.rotation.executors.conftest import file_source  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db


def make(name, secret_type="generic", **kwargs):
    return ManagedSecret.objects.create(name=name, secret_type=secret_type, source="file", path=f"x/{name}", **kwargs)


def test_config_that_looks_secret_is_refused():
    secret = ManagedSecret(name="db", secret_type="database_credential", source="file", path="db",
                           config={"host": "h", "nested": {"admin_password": "pw"}, "client_secret": "s"})
    with pytest.raises(ValidationError) as info:
        secret.full_clean()
    assert "nested.admin_password" in str(info.value) and "client_secret" in str(info.value)
    assert "pw" not in str(info.value).replace("password", "")


def test_a_policy_and_a_run_name_exactly_one_target(system_actor):
    secret = make("one")
    services.ensure_secret_policy(secret)
    with pytest.raises(IntegrityError), transaction.atomic():
        RotationPolicy.objects.create()
    with pytest.raises(IntegrityError), transaction.atomic():
        RotationRun.objects.create(initiator="x")


def test_only_one_active_run_per_secret(file_source, system_actor):  # noqa: F811
    file_source.write("x/solo", "v1")
    secret = services.register_secret(name="solo", secret_type="generic", source="file", path="x/solo",
                                      actor=system_actor)
    services.update_secret_policy(secret, actor=system_actor, approvals_required=1)
    first = services.start_run(secret=secret, actor=system_actor)
    with pytest.raises(RunAlreadyActive, match="secret solo already has an active run"):
        services.start_run(secret=secret, actor=system_actor)
    assert first.state == "pending_approval"


def test_daily_check_flags_expiring_and_overdue_secrets_once_and_tells_the_owner(system_actor, mailoutbox, settings):
    # given: a certificate expiring in 20 days (TLS warns 30 days ahead), a cookie keyring overdue by a day,
    # and a generic secret that is fine
    now = timezone.now()
    settings.NOTIFY_EMAIL_TO = ["secops@example.com"]
    cert = make("api-cert", "tls_certificate", owner="platform@example.com", expires_at=now + timedelta(days=20))
    cookies = make("cookies", "cookie_signing", owner="web")
    fine = make("fine", "generic", expires_at=now + timedelta(days=200))
    for secret in (cert, cookies, fine):
        services.ensure_secret_policy(secret)
    RotationPolicy.objects.filter(secret=cookies).update(next_due_at=now - timedelta(days=1))
    RotationPolicy.objects.filter(secret=fine).update(next_due_at=now + timedelta(days=30))

    # when
    attention = {s.name: reasons for s, reasons in services.secrets_needing_attention(now)}
    flagged = services.flag_expiring_secrets(now=now)
    again = services.flag_expiring_secrets(now=now + timedelta(hours=1))

    # then
    assert set(attention) == {"api-cert", "cookies"}
    assert "expires" in attention["api-cert"][0] and "overdue" in attention["cookies"][0]
    assert {s.name for s in flagged} == {"api-cert", "cookies"} and again == []
    assert ManagedSecret.objects.get(name="api-cert").status == "expiring"
    assert ManagedSecret.objects.get(name="cookies").status == "overdue"
    assert ManagedSecret.objects.get(name="fine").status == "active"
    events = AuditEvent.objects.filter(action="secret", details__event="needs_attention")
    assert sorted(e.target_id for e in events) == ["api-cert", "cookies"]
    recipients = sorted(tuple(m.to) for m in mailoutbox)
    assert recipients == [("secops@example.com",), ("secops@example.com", "platform@example.com")]


def test_expired_secrets_are_flagged_as_expired(system_actor):
    now = timezone.now()
    secret = make("old-cert", "tls_certificate", expires_at=now - timedelta(hours=1))
    services.ensure_secret_policy(secret)
    services.flag_expiring_secrets(now=now)
    assert ManagedSecret.objects.get(pk=secret.pk).status == "expired"


class Hook:
    def __init__(self, status=204):
        self.bodies = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                hook.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_webhook_notifier_posts_json_and_a_broken_one_does_not_stop_the_others(settings, mailoutbox):
    hook = Hook()
    try:
        settings.NOTIFY_WEBHOOK_URL = hook.url
        settings.NOTIFY_EMAIL_TO = ["ops@example.com"]
        results = notify.notify(notify.Notice(subject="s1", body="b", target="secret:x", data={"secret": "x"}))
        assert results == {"log": "sent", "email": "sent", "webhook": "sent"}
        assert hook.bodies[0]["subject"] == "s1" and hook.bodies[0]["data"] == {"secret": "x"}

        settings.NOTIFY_WEBHOOK_URL = "http://127.0.0.1:9/nothing-listens"
        results = notify.notify(notify.Notice(subject="s2", body="b"))
        assert results["webhook"].startswith("URLError") and results["email"] == "sent"
        assert [m.subject for m in mailoutbox] == ["s1", "s2"]
    finally:
        hook.close()


def test_cli_starts_a_secret_rotation(file_source, system_actor, capsys):  # noqa: F811
    file_source.write("web/keyring", keyring.dump(keyring.new_key(), []))
    services.register_secret(name="web-cookies", secret_type="cookie_signing", source="file", path="web/keyring",
                             actor=system_actor)
    call_command("rotation", "start", "--secret", "web-cookies", "--inline")
    run_id = int(re.match(r"run #(\d+) started \(secret web-cookies, ", capsys.readouterr().out).group(1))
    run = RotationRun.objects.get(pk=run_id)
    assert run.secret.name == "web-cookies" and run.state == "retiring"
    assert len(keyring.parse(file_source.read("web/keyring").value)[1]) == 1
    call_command("rotation", "list")
    assert f"#{run_id}\tsecret web-cookies" in capsys.readouterr().out


def test_cli_names_an_unknown_secret(capsys):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no managed secret named 'nope'"):
        call_command("rotation", "start", "--secret", "nope")


def test_beat_sweep_starts_due_automatic_secret_rotations(file_source, system_actor):  # noqa: F811
    file_source.write("x/auto", "v1")
    secret = services.register_secret(name="auto", secret_type="generic", source="file", path="x/auto",
                                      actor=system_actor)
    RotationPolicy.objects.filter(secret=secret).update(next_due_at=timezone.now() - timedelta(minutes=1))
    with services.inline_dispatch():
        started = services.dispatch_due_rotations()
    assert [run.secret_id for run in started] == [secret.pk] and started[0].kind == "planned"


# -- console ------------------------------------------------------------------------------


@pytest.fixture
def admin_console(client):
    from tests.keyvault import make_role_user

    client.force_login(make_role_user("administrator"))
    return client


def test_console_lists_secrets_with_badges_and_starts_a_rotation_beside_its_runbook(
    admin_console, file_source, system_actor  # noqa: F811
):
    # given: a generic secret overdue for rotation
    file_source.write("x/api-key", "v1")
    secret = services.register_secret(name="api-key", secret_type="generic", source="file", path="x/api-key",
                                      owner="team-a", actor=system_actor)
    RotationPolicy.objects.filter(secret=secret).update(next_due_at=timezone.now() - timedelta(days=2))

    # when / then: the list shows type, owner and an overdue badge; the attention filter keeps it
    page = admin_console.get("/keyvault/managedsecret/?attention=yes").content.decode()
    assert "api-key" in page and "team-a" in page and "overdue since" in page
    # the change page shows the policy and the start-rotation link
    change = admin_console.get(f"/keyvault/managedsecret/{secret.pk}/change/").content.decode()
    assert "every 90d" in change and "Start rotation" in change
    # the rotate page has the runbook panel of the secret's type
    rotate = admin_console.get(f"/keyvault/managedsecret/{secret.pk}/rotate/").content.decode()
    assert "Runbook: Generic secret rotation" in rotate
    # an emergency without an incident is refused with a form error, not a 500
    refused = admin_console.post(f"/keyvault/managedsecret/{secret.pk}/rotate/", {"kind": "emergency"})
    assert refused.status_code == 200 and "incident" in refused.content.decode()
    with services.inline_dispatch():
        started = admin_console.post(f"/keyvault/managedsecret/{secret.pk}/rotate/", {"kind": "on_demand", "reason": "drill"})
    run = RotationRun.objects.get(secret=secret)
    assert started.status_code == 302 and started["Location"].endswith(f"/rotation/rotationrun/{run.pk}/change/")


def test_console_add_form_registers_a_postgres_credential_and_refuses_a_password_in_config(admin_console, settings):
    base = {"name": "orders-db", "secret_type": "database_credential", "source": "file", "path": "orders/db",
            "owner": "orders", "description": ""}
    bad = admin_console.post("/keyvault/managedsecret/add/", {**base, "config": json.dumps(
        {"host": "db", "dbname": "orders", "usernames": ["a", "b"], "admin_dsn": "host=db password=hunter2"})})
    assert bad.status_code == 200 and "must not contain a password" in bad.content.decode()
    assert "hunter2" not in bad.content.decode().split("<textarea")[0]
    config = json.dumps({"host": "db", "dbname": "orders", "usernames": ["orders_blue", "orders_green"],
                         "admin_dsn": "host=db user=postgres"})
    unlisted = admin_console.post("/keyvault/managedsecret/add/", {**base, "config": config})
    assert unlisted.status_code == 200 and "postgresql://db:5432 is not in HMD_OUTBOUND_ALLOWLIST" in unlisted.content.decode()
    settings.OUTBOUND_ALLOWLIST = ["postgresql://db:5432"]
    good = admin_console.post("/keyvault/managedsecret/add/", {**base, "config": config})
    assert good.status_code == 302
    secret = ManagedSecret.objects.get(name="orders-db")
    assert secret.rotation_policy.period == timedelta(days=30)
    assert AuditEvent.objects.filter(action="secret", target_id="orders-db", details__event="registered").exists()


def test_operators_cannot_reach_the_rotate_page(client, system_actor):
    from tests.keyvault import make_role_user

    secret = make("locked")
    client.force_login(make_role_user("auditor"))
    assert client.get(f"/keyvault/managedsecret/{secret.pk}/rotate/").status_code == 403


# -- issue 12: changes are audited, re-pointing needs a second person, emergencies need their permission ----------


@pytest.fixture
def registered(file_source, system_actor):  # noqa: F811
    file_source.write("x/api", "v1")
    file_source.write("x/other", "v1")
    return services.register_secret(name="api", secret_type="generic", source="file", path="x/api", owner="team-a",
                                    config={"length": 32}, actor=system_actor)


def test_console_edit_of_a_secret_is_audited_in_the_chain_with_before_and_after(admin_console, registered):
    # given: a registered secret
    url = f"/keyvault/managedsecret/{registered.pk}/change/"
    form = {"source": "file", "path": "x/other", "owner": "team-b", "description": "", "warn_before": "",
            "config": json.dumps({"length": 48, "alphabet": "hex"})}

    # when: an administrator re-points it in the console
    response = admin_console.post(url, form)

    # then: saved, and one chained event holds before and after
    assert response.status_code == 302
    secret = ManagedSecret.objects.get(pk=registered.pk)
    assert (secret.path, secret.owner) == ("x/other", "team-b")
    event = AuditEvent.objects.get(action="secret", target_id="api", details__event="repointed")
    changes = event.details["changes"]
    assert changes["path"] == {"before": "x/api", "after": "x/other"}
    assert changes["owner"] == {"before": "team-a", "after": "team-b"}
    assert changes["config"]["before"] == {"length": 32}
    assert changes["config"]["after"] == {"length": 48, "alphabet": "hex"}
    assert event.actor == "user:administrator" and event.details["next_run_needs_approval"] is True


def test_a_change_that_does_not_re_point_is_audited_as_a_change(registered, system_actor):
    services.update_secret(registered, actor=system_actor, owner="team-c")
    event = AuditEvent.objects.get(action="secret", target_id="api", details__event="changed")
    assert event.details["changes"] == {"owner": {"before": "team-a", "after": "team-c"}}
    # and the next run needs no extra approval
    with services.inline_dispatch():
        run = services.start_run(secret=registered, actor=system_actor)
    assert run.state != "pending_approval"


def test_the_run_after_a_re_pointing_waits_for_someone_other_than_the_re_pointer(registered, system_actor):
    from django.contrib.auth.models import Group, User

    from keyvault.access.roles import KEY_ADMINISTRATORS, KEY_OPERATORS
    from keyvault.audit import Actor
    from rotation.exceptions import ApprovalRefused

    mallory = User.objects.create_user("mallory", is_staff=True)
    mallory.groups.add(Group.objects.get(name=KEY_ADMINISTRATORS))
    bella = User.objects.create_user("bella", is_staff=True)
    bella.groups.add(Group.objects.get(name=KEY_OPERATORS))
    # given: a policy without approvals, and an administrator who re-points the secret
    services.update_secret(registered, actor=Actor.user(mallory), path="x/other")

    # when: a rotation is started (by anyone, here a colleague)
    run = services.start_run(secret=registered, actor=Actor.user(bella), user=bella, reason="routine")

    # then: it waits for an approval; the re-pointer cannot give it, the initiator cannot either
    assert run.state == "pending_approval"
    with pytest.raises(ApprovalRefused, match="mallory re-pointed secret api"):
        services.decide(run, user=mallory, actor=Actor.user(mallory), comment="fine")
    with pytest.raises(ApprovalRefused, match="initiator"):
        services.decide(run, user=bella, actor=Actor.user(bella), comment="fine")
    # a third person's approval queues it, and later runs need no extra approval
    adam = User.objects.create_user("adam", is_staff=True)
    adam.groups.add(Group.objects.get(name=KEY_ADMINISTRATORS))
    with services.inline_dispatch():
        services.decide(run, user=adam, actor=Actor.user(adam), comment="checked the new path")
    run = services.drive(run.pk)
    assert run.state in ("retiring", "completed")
    next_run = services.start_run(secret=registered, actor=system_actor, kind="emergency", incident_ref="INC-9")
    assert next_run.state != "pending_approval"


def test_re_pointing_is_refused_while_a_run_is_active_or_failed(registered, system_actor):
    from rotation.exceptions import RotationError

    services.update_secret_policy(registered, actor=system_actor, approvals_required=1)
    run = services.start_run(secret=registered, actor=system_actor)
    with pytest.raises(RotationError, match=f"run #{run.pk} \\(pending approval\\)"):
        services.update_secret(registered, actor=system_actor, path="x/other")
    assert ManagedSecret.objects.get(pk=registered.pk).path == "x/api"
    assert not AuditEvent.objects.filter(action="secret", details__event="repointed").exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_run_started_while_a_re_pointing_commits_still_waits_for_approval(registered, system_actor, monkeypatch):
    from django.db import connection

    from tests.conftest import is_postgres

    if not is_postgres():
        pytest.fail("postgres-marked tests run only on PostgreSQL (scripts/test.sh deselects them elsewhere)")
    # given: a policy without approvals, and a re-pointing that has written its event but not yet committed
    written, started = threading.Event(), threading.Event()
    from keyvault.audit import events
    from rotation.engine import runs

    original = events.secret_changed

    def slow_event(*args, **kwargs):
        original(*args, **kwargs)
        written.set()
        started.wait(timeout=2)  # commit only after the run started, or after 2 s if starting it waits for us

    monkeypatch.setattr(events, "secret_changed", slow_event)
    monkeypatch.setattr(runs, "enqueue_run", lambda run: None)

    def re_point():
        try:
            services.update_secret(registered, actor=system_actor, path="x/other")
        finally:
            connection.close()

    worker = threading.Thread(target=re_point)
    worker.start()
    assert written.wait(timeout=10)

    # when: a rotation is started at that moment
    run = services.start_run(secret=registered, actor=system_actor)
    started.set()
    worker.join(timeout=10)

    # then: it never runs through the new pointer without a second person
    assert ManagedSecret.objects.get(pk=registered.pk).path == "x/other"
    assert run.state == "pending_approval"


def test_re_pointing_at_keyvaults_own_secret_is_refused(registered, system_actor, monkeypatch, settings):
    from rotation.executors.base import SecretConfigError

    monkeypatch.setenv("HMD_AUDIT_HMAC_KEY", "own")
    settings.SECRET_SOURCES = {"default": "file", "sources": {**settings.SECRET_SOURCES["sources"], "env": {}}}
    with pytest.raises(SecretConfigError, match="HMD_AUDIT_HMAC_KEY is one of Keyvault's own settings"):
        services.update_secret(registered, actor=system_actor, source="env", path="AUDIT_HMAC_KEY")
    assert ManagedSecret.objects.get(pk=registered.pk).source == "file"
    refused = AuditEvent.objects.get(action="secret", target_id="api", details__event="own_secret_refused")
    assert refused.outcome == "denied" and refused.details["path"] == "AUDIT_HMAC_KEY"
    assert not AuditEvent.objects.filter(action="secret", target_id="api", details__event="repointed").exists()


def test_an_operator_gets_403_for_an_emergency_secret_rotation_as_for_a_kek(client, registered):
    from tests.keyvault import make_role_user

    client.force_login(make_role_user("operator"))
    url = f"/keyvault/managedsecret/{registered.pk}/rotate/"
    assert b"Emergency" not in client.get(url).content  # not offered
    refused = client.post(url, {"kind": "emergency", "incident_ref": "INC-1", "reason": "leak"})
    assert refused.status_code == 403 and not RotationRun.objects.filter(secret=registered).exists()


def test_cli_emergency_rotation_of_a_secret_needs_the_emergency_permission(registered):
    from django.contrib.auth.models import Group, User
    from django.core.management.base import CommandError

    from keyvault.access.roles import KEY_OPERATORS

    olivia = User.objects.create_user("olivia", is_staff=True)
    olivia.groups.add(Group.objects.get(name=KEY_OPERATORS))
    with pytest.raises(CommandError, match="olivia may not start emergency runs of a managed secret"):
        call_command("rotation", "start", "--secret", "api", "--kind", "emergency", "--incident", "INC-1",
                     "--user", "olivia")
    assert not RotationRun.objects.filter(secret=registered).exists()
