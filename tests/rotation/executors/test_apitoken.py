"""Keyvault API client tokens rotated as managed secrets, proven by real HTTP calls to a live Keyvault.

The token lives in the real file source; the verification call goes over a socket to the
live test server (``live_server``), the same ``/api/v1/`` an application uses; every
token change goes through ``keyvault.api.services`` and is checked in the audit chain.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from keyvault import audit
from keyvault.api import services as api
from keyvault.exceptions import ApiAuthenticationFailed
from keyvault.keys import services as key_services
from keyvault.models import ApiClient, ApiToken, AuditEvent, ManagedSecret
from rotation import runbooks, services
from rotation.exceptions import ConfigFieldError
from rotation.executors.apitoken import probe
from rotation.models import RotationRun
from tests.docs.examples import ROOT
from tests.rotation.executors.conftest import rotate, steps

pytestmark = pytest.mark.django_db(transaction=True)

PATH = "billing/api-token"


@pytest.fixture
def billing(live_server, file_source, system_actor):
    """Client ``billing`` with its token stored at ``file:billing/api-token``, registered as a managed secret."""
    kek = key_services.create_kek(name="billing-kek", actor=system_actor)
    client, token = api.create_client(name="billing", actor=system_actor, keks=[kek.name], operations=["unwrap"])
    file_source.write(PATH, token)
    secret = services.register_secret(name="billing-api-token", secret_type="api_client_token", source="file",
                                      path=PATH, actor=system_actor,
                                      config={"client": "billing", "api_url": live_server.url, "overlap_hours": 6})
    return secret, token, file_source, live_server.url


def works(token: str) -> bool:
    try:
        api.authenticate(f"Bearer {token}")
    except ApiAuthenticationFailed:
        return False
    return True


def token_events(*kinds: str) -> list[dict]:
    rows = AuditEvent.objects.filter(target_type="apiclient", target_id="billing").order_by("pk")
    return [dict(row.details, actor=row.actor) for row in rows if row.details.get("event") in kinds]


def test_planned_rotation_delivers_a_verified_token_and_revokes_the_old_one_at_the_end_of_the_overlap(
        billing, system_actor):
    secret, old, source, url = billing
    t0 = timezone.now()
    # when the run starts
    run = rotate(secret, actor=system_actor, now=t0)
    new = source.read(PATH).value
    # then the new token is in the source, proven over HTTP, and the old one keeps working through the overlap
    assert run.state == "retiring", run.last_error
    assert new != old and works(new) and works(old)
    assert probe(url, new)[0] == 200 and probe(url, old)[0] == 200
    assert steps(run)["verify.api"] == "done" and steps(run)["rotate.install"] == "done"
    assert run.retire_after == t0 + timedelta(hours=6)
    assert old not in json.dumps(run.executor_state) and new not in json.dumps(run.executor_state)
    assert [e["event"] for e in token_events("token_rotated")] == ["token_rotated"]
    # when the overlap is over
    run = services.drive(run.pk, now=t0 + timedelta(hours=6, seconds=1))
    # then the old token is revoked by the service, audited, and only the new one is accepted
    assert run.state == "completed", run.last_error
    assert not works(old) and works(new) and probe(url, old)[0] == 401
    assert token_events("tokens_revoked")[-1]["reason"].startswith("end of the overlap")
    assert audit.verify_chain().ok


def test_emergency_rotation_revokes_every_other_token_at_once_but_not_the_client(billing, system_actor):
    secret, old, source, url = billing
    run = rotate(secret, actor=system_actor, now=timezone.now(), kind="emergency", incident_ref="INC-9",
                 reason="token in a build log")
    new = source.read(PATH).value
    assert run.state in ("retiring", "completed"), run.last_error
    assert not works(old) and probe(url, old)[0] == 401
    assert works(new) and ApiToken.objects.get(digest=api.token_digest(new)).client.enabled
    revoked = token_events("tokens_revoked")[-1]
    assert revoked["reason"].startswith("emergency rotation") and revoked["token_prefixes"] == [old[:10]]
    assert steps(run)["rotate.revoke"] == "done"


def test_a_failed_delivery_revokes_the_new_token_and_the_old_one_keeps_working(billing, system_actor, settings):
    secret, old, source, _ = billing
    expiry_before = ApiToken.objects.get(digest=api.token_digest(old)).expires_at
    # given the source refuses writes
    sources = {"default": "file", "sources": {"file": {"directory": str(source.root), "read_only": True}}}
    with override_settings(SECRET_SOURCES=sources):
        run = rotate(secret, actor=system_actor, now=timezone.now())
    # then the run failed, the token issued for it is revoked, the old one works as before (no overlap expiry)
    assert run.state == "failed" and "read-only" in run.last_error
    tokens = list(ApiToken.objects.filter(client__name="billing").order_by("pk"))
    assert len(tokens) == 2 and tokens[1].revoked_at is not None
    assert works(old) and expiry_before is None and tokens[0].expires_at is None
    assert source.read(PATH).value == old
    assert [e["event"] for e in token_events("tokens_revoked", "token_reinstated")] == ["tokens_revoked",
                                                                                      "token_reinstated"]


def test_a_token_the_api_refuses_fails_verification_and_is_rolled_back(billing, system_actor):
    secret, old, source, _ = billing
    # given the client may only call from a network the worker is not in: the API answers 403 to any token
    ApiClient.objects.filter(name="billing").update(allowed_networks=["10.99.0.0/16"])
    run = rotate(secret, actor=system_actor, now=timezone.now())
    assert run.state == "failed" and "HTTP 403" in run.last_error
    assert steps(run)["verify.api"] == "failed"
    assert source.read(PATH).value == old
    live = ApiToken.objects.filter(client__name="billing", revoked_at__isnull=True)
    assert [t.digest for t in live] == [api.token_digest(old)] and live[0].expires_at is None


def test_rollback_before_retirement_restores_the_old_token_and_revokes_the_new(billing, system_actor):
    secret, old, source, _ = billing
    run = rotate(secret, actor=system_actor, now=timezone.now())
    new = source.read(PATH).value
    services.rollback(run, actor=system_actor, reason="billing cannot redeploy today")
    assert source.read(PATH).value == old
    assert works(old) and not works(new)
    assert ApiToken.objects.get(digest=api.token_digest(old)).expires_at is None


def test_a_worker_killed_between_issuing_and_recording_the_token_resumes_and_revokes_the_lost_one(
        billing, system_actor):
    secret, old, source, url = billing
    previous = ApiToken.objects.get(digest=api.token_digest(old))
    with services.inline_dispatch():
        run = services.start_run(secret=secret, actor=system_actor, reason="resume test")
    # given the state a SIGKILL leaves right after rotate_token committed and before the run recorded the token
    now = timezone.now()
    RotationRun.objects.filter(pk=run.pk).update(state="rotating", started_at=now, executor_state={
        "prechecked": True, "previous_version": source.read(PATH).version, "previous_token": previous.pk,
        "previous_prefix": previous.prefix, "previous_expires_at": None, "issuing_since": now.isoformat()})
    lost = api.rotate_token("billing", actor=system_actor, overlap=timedelta(hours=6))
    # when another worker resumes the run
    run = services.drive(run.pk, now=timezone.now())
    # then the lost token is revoked, a new one is delivered and verified, the old one still works
    new = source.read(PATH).value
    assert run.state == "retiring", run.last_error
    assert not works(lost) and works(new) and works(old) and probe(url, new)[0] == 200
    assert "interrupted attempt" in token_events("tokens_revoked")[0]["reason"]


@pytest.mark.parametrize(("config", "field", "message"), [
    ({"client": "nobody"}, "client", "no API client named 'nobody'"),
    ({"overlap_hours": 0}, "overlap_hours", "must be from 1 to 8784"),
    ({"overlap_hours": 9000}, "overlap_hours", "must be from 1 to 8784"),
    ({"overlap_hours": "24"}, "overlap_hours", "must be an integer"),
    ({"api_url": "http://keyvault.example"}, "api_url", "must be https"),
    ({"api_url": None}, "api_url", "is required"),
])
def test_registration_refuses_a_bad_configuration_naming_the_field(billing, system_actor, config, field, message):
    _, _, _, url = billing
    with pytest.raises(ConfigFieldError) as info:
        services.register_secret(name="bad", secret_type="api_client_token", source="file", path="x",
                                 config={"client": "billing", "api_url": url, **config}, actor=system_actor)
    assert info.value.field == field and message in str(info.value)
    assert not ManagedSecret.objects.filter(name="bad").exists()


def test_registration_refuses_a_revoked_client(billing, system_actor):
    _, _, _, url = billing
    api.revoke_client("billing", actor=system_actor)
    with pytest.raises(ConfigFieldError, match="is revoked"):
        services.register_secret(name="bad", secret_type="api_client_token", source="file", path="x",
                                 config={"client": "billing", "api_url": url}, actor=system_actor)


def test_a_stored_value_that_is_not_the_clients_newest_token_stops_the_run_before_anything_is_issued(
        billing, system_actor):
    secret, old, _, _ = billing
    newer = api.rotate_token("billing", actor=system_actor)  # issued by hand; the source still holds the old one
    run = rotate(secret, actor=system_actor, now=timezone.now())
    assert run.state == "failed" and "newer token" in run.last_error
    assert works(old) and works(newer) and ApiToken.objects.filter(client__name="billing").count() == 2


def test_the_secret_command_registers_and_the_rotation_command_rotates(live_server, file_source, system_actor,
                                                                       capsys):
    kek = key_services.create_kek(name="cli-kek", actor=system_actor)
    _, old = api.create_client(name="cli", actor=system_actor, keks=[kek.name], operations=["unwrap"])
    file_source.write("cli/token", old)
    call_command("secret", "add", "cli-token", "--type", "api_client_token", "--source", "file", "--path", "cli/token",
                 "--set", "client=cli", "--set", f"api_url={live_server.url}", "--set", "overlap_hours=2")
    assert "registered cli-token" in capsys.readouterr().out
    assert ManagedSecret.objects.get(name="cli-token").config["overlap_hours"] == 2
    call_command("rotation", "start", "--secret", "cli-token", "--reason", "cli test", "--inline")
    run = RotationRun.objects.get(secret__name="cli-token")
    assert run.state == "retiring", run.last_error
    new = file_source.read("cli/token").value
    assert new != old and works(new) and works(old)


def test_both_runbooks_are_rendered_into_the_key_rotation_doc():
    doc = (ROOT / "docs" / "ops" / "key-rotation.md").read_text()
    planned = runbooks.for_run("secret-api_client_token", "planned")
    emergency = runbooks.for_run("secret-api_client_token", "emergency")
    assert planned is not None and emergency is not None and planned is not emergency
    assert {"precheck.source", "rotate.install", "verify.api", "retire"} <= {s.key for s in planned.steps}
    assert "rotate.revoke" in {s.key for s in emergency.steps}
    for runbook in (planned, emergency):
        assert f'<a id="runbook-{runbook.slug}"></a>\n\n' + runbook.markdown(heading_level=4).strip() in doc
