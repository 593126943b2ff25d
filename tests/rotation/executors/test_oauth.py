"""OAuth client secrets: the guided rotation, verified against a local token endpoint (client credentials, Basic)."""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from rotation import services
from rotation.exceptions import RotationError
from tests.rotation.executors.conftest import steps

pytestmark = pytest.mark.django_db


class TokenEndpoint:
    """An OAuth 2.0 token endpoint on 127.0.0.1 accepting client_credentials with HTTP Basic for ``valid`` secrets."""

    def __init__(self, client_id: str, valid: set[str]):
        self.client_id, self.valid, self.requests = client_id, valid, []
        #: every client secret it was sent, valid or not (what an attacker's endpoint would keep)
        self.secrets: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                scheme, _, encoded = (self.headers.get("Authorization") or "").partition(" ")
                client, _, secret = base64.b64decode(encoded).decode().partition(":") if scheme == "Basic" else ("", "", "")
                client, secret = urllib.parse.unquote(client), urllib.parse.unquote(secret)
                endpoint.requests.append(form.get("grant_type"))
                endpoint.secrets += [secret] if secret else form.get("client_secret", [])
                ok = (form.get("grant_type") == ["client_credentials"] and client == endpoint.client_id
                      and secret in endpoint.valid)
                body = {"access_token": "at-123", "token_type": "Bearer", "expires_in": 300} if ok else {"error": "invalid_client"}
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body).encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/oauth2/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def idp():
    endpoint = TokenEndpoint("billing-app", {"old-secret-1"})
    yield endpoint
    endpoint.close()


@pytest.fixture
def client_secret(idp, file_source, system_actor):
    file_source.write("oauth/billing", "old-secret-1")
    secret = services.register_secret(
        name="billing-oauth", secret_type="oauth_client_secret", source="file", path="oauth/billing",
        owner="billing", actor=system_actor, config={"token_endpoint": idp.url, "client_id": "billing-app"},
    )
    services.update_secret_policy(secret, actor=system_actor, grace_period=timedelta(days=3))
    return secret


def test_guided_rotation_records_each_person_step_and_enforces_the_overlap_window(
    client_secret, idp, file_source, system_actor, make_user
):
    from keyvault.audit import Actor

    alice = Actor.user(make_user("alice"))
    t0 = timezone.now()

    # given: a run, which checks the current secret against the IdP and then waits for a person
    with services.inline_dispatch():
        run = services.start_run(secret=client_secret, actor=alice)
    run = services.drive(run.pk, now=t0)
    assert run.state == "rotating" and "idp.create" in run.paused_reason
    assert steps(run)["precheck.token"] == "done"

    # when: Alice creates the second secret at the IdP and hands it over
    idp.valid.add("new-secret-2")
    with pytest.raises(RotationError, match="before deploying"):
        services.tick_manual_step(run, "deploy", actor=alice)
    with services.inline_dispatch():
        services.tick_manual_step(run, "idp.create", actor=alice, evidence="IdP secret id 42, expires 2027-06")
        with pytest.raises(RotationError, match="that is the current secret"):
            services.provide_secret_value(run, "old-secret-1", actor=alice)
        services.provide_secret_value(run, "new-secret-2", actor=alice)
        services.tick_manual_step(run, "deploy", actor=alice, evidence="billing redeployed")
    run = services.drive(run.pk, now=t0)

    # then: stored, verified with a real token request, and in the overlap window
    assert file_source.read("oauth/billing").value == "new-secret-2"
    assert run.state == "retiring" and run.retire_after == t0 + timedelta(days=3)
    assert "HTTP 200" in run.steps.get(key="verify.token").evidence
    create = run.steps.get(key="idp.create")
    assert (create.status, create.done_by, create.evidence) == ("done", "user:alice", "IdP secret id 42, expires 2027-06")
    assert "new-secret-2" not in json.dumps(run.executor_state)

    # when: someone tries to revoke the old secret inside the overlap window
    with pytest.raises(RotationError, match="overlap window lasts until"):
        services.tick_manual_step(run, "idp.revoke", actor=alice)

    # when: after the window, the revocation is ticked but the IdP still accepts the old secret
    later = t0 + timedelta(days=3, minutes=1)
    run.retire_after = t0  # the engine compares with the real clock when ticking
    run.save(update_fields=["retire_after"])
    with services.inline_dispatch():
        services.tick_manual_step(run, "idp.revoke", actor=alice, evidence="revoked in the IdP console")
    run = services.drive(run.pk, now=later)
    assert run.state == "retiring" and steps(run)["idp.revoke"] == "pending"
    assert "still accepts the old secret" in run.paused_reason

    # when: the old secret is really revoked and the step ticked again
    idp.valid.discard("old-secret-1")
    with services.inline_dispatch():
        services.tick_manual_step(run, "idp.revoke", actor=alice, evidence="revoked, for real")
    run = services.drive(run.pk, now=later)

    # then
    assert run.state == "completed"
    assert "refused: HTTP 401 invalid_client" in run.steps.get(key="verify.revoked").evidence


def test_a_new_secret_the_idp_refuses_fails_verification_and_the_old_one_is_restored(
    client_secret, idp, file_source, system_actor, make_user
):
    from keyvault.audit import Actor

    bob = Actor.user(make_user("bob"))
    with services.inline_dispatch():
        run = services.start_run(secret=client_secret, actor=bob)
        services.drive(run.pk)
        services.tick_manual_step(run, "idp.create", actor=bob)
        services.provide_secret_value(run, "typo-secret", actor=bob)  # never created at the IdP
        services.tick_manual_step(run, "deploy", actor=bob)
    run = services.drive(run.pk)
    assert run.state == "failed" and "refused the new secret (HTTP 401 invalid_client)" in run.last_error
    assert file_source.read("oauth/billing").value == "old-secret-1"
    assert "typo-secret" not in run.last_error


def test_a_plain_http_token_endpoint_off_localhost_is_refused(file_source, system_actor):
    from rotation.executors.base import SecretConfigError

    with pytest.raises(SecretConfigError, match="https"):
        services.register_secret(name="x", secret_type="oauth_client_secret", source="file", path="o/x",
                                 actor=system_actor, config={"token_endpoint": "http://idp.example/token", "client_id": "c"})


# -- issue 15: the emergency variant lets a person revoke the leaked secret now ----------------------------------


def test_an_emergency_run_lets_the_leaked_secret_be_revoked_before_the_new_one_exists(
    client_secret, idp, file_source, system_actor, make_user
):
    from keyvault.audit import Actor

    alice = Actor.user(make_user("alice"))
    with services.inline_dispatch():
        run = services.start_run(secret=client_secret, actor=system_actor, kind="emergency", incident_ref="INC-15")
    run = services.drive(run.pk)
    assert run.state == "rotating" and "idp.create" in run.paused_reason

    # when: revoke now — the leaked secret is revoked at the IdP and ticked before anything else
    idp.valid.discard("old-secret-1")
    services.tick_manual_step(run, "idp.revoke", actor=alice, evidence="secret 41 deleted at 03:12")

    # and: the new secret is created, handed over and deployed
    idp.valid.add("new-secret-2")
    with services.inline_dispatch():
        services.tick_manual_step(run, "idp.create", actor=alice, evidence="secret 42")
        services.provide_secret_value(run, "new-secret-2", actor=alice)
        services.tick_manual_step(run, "deploy", actor=alice, evidence="billing restarted")
    run = services.drive(run.pk)

    # then: no overlap window — verified, the old secret proven refused, and completed
    assert run.state == "completed", run.last_error
    assert file_source.read("oauth/billing").value == "new-secret-2"
    assert "refused" in run.steps.get(key="verify.revoked").evidence
    assert steps(run)["idp.revoke"] == "done"


def test_a_secret_already_revoked_is_noted_by_an_emergency_run_but_fails_a_planned_one(client_secret, idp, system_actor):
    # given: the IdP already refuses the current secret
    idp.valid.discard("old-secret-1")

    # when / then: an on-demand run fails its pre-check
    with services.inline_dispatch():
        run = services.start_run(secret=client_secret, actor=system_actor)
    run = services.drive(run.pk)
    assert run.state == "failed" and "already refused" in run.last_error

    # when / then: an emergency run notes it and waits for the new secret
    with services.inline_dispatch():
        emergency = services.start_run(secret=client_secret, actor=system_actor, kind="emergency", incident_ref="INC-9")
    emergency = services.drive(emergency.pk)
    assert emergency.state == "rotating", emergency.last_error
    assert "revoked at the IdP" in emergency.steps.get(key="precheck.token").evidence
