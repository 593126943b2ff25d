"""Vault AppRole secret ids rotated against a real OpenBao dev server (``bao server -dev``).

Keyvault administers the role with a token holding only the documented policy, keeps the
secret id in OpenBao's KV v2, and every claim is checked by logging in for real.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings
from django.utils import timezone

from keyvault.secrets import get_source
from rotation import services
from rotation.executors.base import SecretConfigError
from tests.rotation.executors.conftest import rotate, steps

pytestmark = pytest.mark.django_db

KV_PREFIX = "h15"


def admin_policy(role: str) -> str:
    """What the executor's module docstring says Keyvault needs: nothing more."""
    return "\n".join(
        [f'path "auth/approle/role/{role}/role-id" {{ capabilities = ["read"] }}']
        + [f'path "auth/approle/role/{role}/{tail}" {{ capabilities = ["update"] }}'
           for tail in ("secret-id", "secret-id/lookup", "secret-id-accessor/lookup", "secret-id-accessor/destroy")]
        + [f'path "secret/data/{KV_PREFIX}/*" {{ capabilities = ["create", "read", "update"] }}',
           f'path "secret/metadata/{KV_PREFIX}/*" {{ capabilities = ["read", "list"] }}',
           f'path "secret/destroy/{KV_PREFIX}/*" {{ capabilities = ["update"] }}']
    )


@pytest.fixture
def approle(openbao_server, system_actor):
    """A role with one secret id stored in KV, Keyvault's vault source on a least-privilege token, the managed secret."""
    server = openbao_server
    role = f"app-{uuid.uuid4().hex[:8]}"
    server.write_policy(f"{role}-app", 'path "sys/health" { capabilities = ["read"] }')
    role_id, secret_id = server.approle_credentials(role, [f"{role}-app"])
    server.write_policy(f"{role}-admin", admin_policy(role))
    options = {"addr": server.addr, "token": server.create_token([f"{role}-admin"])}
    path = f"{KV_PREFIX}/{role}#secret_id"
    with override_settings(SECRET_SOURCES={"default": "vault", "sources": {"vault": options}}):
        get_source("vault").write(path, secret_id)
        secret = services.register_secret(name=role, secret_type="vault_approle_secret_id", source="vault", path=path,
                                          config={"role": role}, actor=system_actor)
        yield server, role, role_id, secret_id, secret


def can_login(server, role_id: str, secret_id: str) -> bool:
    try:
        server.request("POST", "auth/approle/login", {"role_id": role_id, "secret_id": secret_id}, token="")
    except RuntimeError:
        return False
    return True


def accessors(server, role: str) -> list[str]:
    try:
        return server.request("LIST", f"auth/approle/role/{role}/secret-id")["data"]["keys"]
    except RuntimeError:  # 404: none left
        return []


def test_rotation_issues_verifies_and_destroys_the_old_secret_id_only_after_consumers_moved(approle, system_actor):
    server, role, role_id, old, secret = approle
    t0 = timezone.now()
    # when the run starts
    run = rotate(secret, actor=system_actor, now=t0)
    new = get_source("vault").read(secret.path).value
    # then a new secret id is stored and proven by a login; the old one still works
    assert run.state == "retiring", run.last_error
    assert new != old and can_login(server, role_id, new) and can_login(server, role_id, old)
    assert steps(run)["verify.login"] == "done" and len(accessors(server, role)) == 2
    assert old not in json.dumps(run.executor_state) and new not in json.dumps(run.executor_state)
    # when the grace period is over but nobody confirmed the consumers restarted
    run = services.drive(run.pk, now=t0 + timedelta(hours=2))
    # then the run waits for that person, and the old secret id is left alone
    assert run.state == "retiring" and "rotate.consumers" in run.paused_reason
    assert can_login(server, role_id, old)
    # when the consumers' step is ticked
    with services.inline_dispatch():
        services.tick_manual_step(run, "rotate.consumers", actor=system_actor, evidence="billing restarted")
    run = services.drive(run.pk, now=t0 + timedelta(hours=2))
    # then the old secret id is destroyed by its accessor, and only the new one logs in
    assert run.state == "completed", run.last_error
    assert not can_login(server, role_id, old) and can_login(server, role_id, new)
    assert len(accessors(server, role)) == 1


def test_rollback_restores_the_old_secret_id_and_destroys_the_new_one(approle, system_actor):
    server, role, role_id, old, secret = approle
    run = rotate(secret, actor=system_actor, now=timezone.now())
    new = get_source("vault").read(secret.path).value
    # when
    services.rollback(run, actor=system_actor, reason="billing cannot restart today")
    # then
    assert get_source("vault").read(secret.path).value == old
    assert can_login(server, role_id, old) and not can_login(server, role_id, new)
    assert len(accessors(server, role)) == 1


def test_a_failed_verification_destroys_the_unverified_secret_id_and_restores_the_source(approle, system_actor):
    server, role, role_id, old, secret = approle
    # given a role that refuses logins from here (Keyvault's login proof cannot succeed)
    server.request("POST", f"auth/approle/role/{role}", {"token_policies": [f"{role}-app"],
                                                         "secret_id_bound_cidrs": ["10.99.0.0/16"]})
    before = accessors(server, role)
    # when
    run = rotate(secret, actor=system_actor, now=timezone.now())
    # then the run failed, the new secret id is gone from Vault, and the old value is current again
    assert run.state == "failed" and "a login with the new secret id was refused" in run.last_error
    assert accessors(server, role) == before
    assert get_source("vault").read(secret.path).value == old


def test_a_value_that_is_not_a_secret_id_of_the_role_stops_the_run_before_anything_is_issued(approle, system_actor):
    server, role, _, _, secret = approle
    get_source("vault").write(secret.path, "not-a-secret-id-of-this-role")
    before = accessors(server, role)
    run = rotate(secret, actor=system_actor, now=timezone.now())
    assert run.state == "failed" and "is not a live secret id of role" in run.last_error
    assert accessors(server, role) == before


def test_registration_refuses_a_missing_or_unsafe_name_and_unknown_keys(system_actor, tmp_path):
    with override_settings(SECRET_SOURCES={"default": "file", "sources": {"file": {"directory": str(tmp_path)}}}):
        for config, message in (({}, "field 'role': is required"),
                                ({"role": "../sys/policy"}, "field 'role': '../sys/policy' is not a Vault name"),
                                ({"role": "ok", "mount": "a/b"}, "field 'mount': 'a/b' is not a Vault name"),
                                ({"role": "ok", "colour": "red"}, "field 'colour': unknown key")):
            with pytest.raises((SecretConfigError, ValidationError), match=message):
                services.register_secret(name="approle-bad", secret_type="vault_approle_secret_id", source="file",
                                         path="x", config=config, actor=system_actor)


def test_a_secret_id_issued_but_not_stored_is_destroyed(approle, system_actor):
    server, role, role_id, old, secret = approle
    # given Keyvault may read the stored secret id but no longer write it
    server.write_policy(f"{role}-admin", admin_policy(role).replace('["create", "read", "update"]', '["read"]'))
    before = accessors(server, role)
    # when
    run = rotate(secret, actor=system_actor, now=timezone.now())
    # then the run failed on the write, the secret id Vault issued for it was destroyed, the old one is untouched
    assert run.state == "failed" and "denied" in run.last_error
    assert accessors(server, role) == before
    assert get_source("vault").read(secret.path).value == old and can_login(server, role_id, old)
