"""PostgreSQL credentials against the real server: blue/green and single-user rotation.

The local server trusts 127.0.0.1 (``pg_hba.conf``: ``host all all 127.0.0.1/32 trust``),
so a login alone would succeed with any password. Every check therefore also
compares the SCRAM-SHA-256 verifier stored in ``pg_authid`` with the password in
the secret source (the executor does so whenever its admin role may read
``pg_authid``), and lockout is checked through ``NOLOGIN``, which trust does not bypass.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import timedelta

import psycopg
import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone
from psycopg import sql

from keyvault.models import ManagedSecret
from rotation import services
from rotation.models import RotationRun
from rotation.executors.base import CredentialRetired, SecretConfigError
from rotation.executors.postgres import scram_matches, scram_verifier
from tests.rotation.executors.conftest import rotate, steps

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

ADMIN_DSN = os.environ.get("HMD_TEST_PG_ADMIN_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


@pytest.fixture
def admin():
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        yield conn


@pytest.fixture
def app_db(admin):
    """A throwaway database and two login roles ``h11_<id>_blue`` / ``_green``; dropped afterwards."""
    tag = f"h11_{uuid.uuid4().hex[:8]}"
    blue, green = f"{tag}_blue", f"{tag}_green"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(tag)))
    for role in (blue, green):
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(scram_verifier("initial-" + role))))
    yield {"db": tag, "blue": blue, "green": green}
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(tag)))
    for role in (blue, green):
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def stored_matches(admin, role, password) -> bool:
    verifier = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", [role]).fetchone()[0]
    return scram_matches(verifier, password)


def can_login(admin, role) -> bool:
    return admin.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", [role]).fetchone()[0]


def connect_as(app_db, document):
    return psycopg.connect(host="127.0.0.1", port=5432, dbname=app_db["db"], user=document["username"],
                           password=document["password"], connect_timeout=5)


@pytest.fixture
def db_secret(app_db, file_source, system_actor):
    return _register_db_secret(app_db, file_source, system_actor)


def _register_db_secret(app_db, file_source, system_actor, **config):
    initial = {"engine": "postgres", "host": "127.0.0.1", "port": 5432, "dbname": app_db["db"],
               "username": app_db["blue"], "password": "initial-" + app_db["blue"]}
    file_source.write("payments/db", json.dumps(initial))
    secret = services.register_secret(
        name="payments-db", secret_type="database_credential", source="file", path="payments/db",
        owner="payments", actor=system_actor,
        config={"host": "127.0.0.1", "port": 5432, "dbname": app_db["db"],
                "usernames": [app_db["blue"], app_db["green"]], "admin_dsn": ADMIN_DSN, **config},
    )
    services.update_secret_policy(secret, actor=system_actor, grace_period=timedelta(hours=1))
    return secret


def test_blue_green_rotation_switches_to_the_inactive_role_and_locks_the_old_one_after_grace(
    db_secret, app_db, admin, file_source, system_actor
):
    # given: blue is active with its initial password, and an application connection is open
    before = json.loads(file_source.read("payments/db").value)
    app_connection = connect_as(app_db, before)
    t0 = timezone.now()

    # when: rotated
    run = rotate(db_secret, actor=system_actor, now=t0)
    after = json.loads(file_source.read("payments/db").value)

    # then: green holds a new strong password that PostgreSQL stores; blue is untouched and still usable
    assert run.state == "retiring", run.last_error
    assert after["username"] == app_db["green"] and len(after["password"]) >= 43
    assert stored_matches(admin, app_db["green"], after["password"])
    assert not stored_matches(admin, app_db["green"], "initial-" + app_db["green"])
    assert stored_matches(admin, app_db["blue"], before["password"]) and can_login(admin, app_db["blue"])
    assert app_connection.execute("SELECT 1").fetchone() == (1,)
    with connect_as(app_db, after) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (app_db["green"],)
    assert {k: v for k, v in steps(run).items() if k.startswith(("rotate.", "verify.login", "precheck.a"))} == {
        "precheck.approvals": "done", "precheck.audit": "done", "precheck.admin": "done",
        "rotate.password": "done", "rotate.login": "done", "rotate.switch": "done", "rotate.reload": "pending",
        "verify.login": "done",
    }
    assert "new_password" not in json.dumps(run.executor_state) and after["password"] not in json.dumps(run.executor_state)

    # when: the grace period is over
    services.execute_run(run.pk, now=t0 + timedelta(hours=1, seconds=1))
    run.refresh_from_db()

    # then: blue can no longer log in (NOLOGIN holds even under trust); green still can
    assert run.state == "completed"
    assert not can_login(admin, app_db["blue"])
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        connect_as(app_db, before)
    with connect_as(app_db, after) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    app_connection.close()

    # when: the next rotation comes, it goes back to blue with a fresh password
    run2 = rotate(db_secret, actor=system_actor, now=t0 + timedelta(days=1))
    third = json.loads(file_source.read("payments/db").value)
    assert run2.state == "retiring"
    assert third["username"] == app_db["blue"] and third["password"] != before["password"]
    assert can_login(admin, app_db["blue"]) and stored_matches(admin, app_db["blue"], third["password"])


def test_a_login_failure_fails_the_run_and_leaves_the_active_credential_in_place(
    db_secret, app_db, admin, file_source, system_actor, mailoutbox
):
    # given: green may not connect to the application database (a real, server-side refusal)
    admin.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(app_db["db"])))
    admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
        sql.Identifier(app_db["db"]), sql.Identifier(app_db["blue"])))
    before = file_source.read("payments/db")

    # when
    run = rotate(db_secret, actor=system_actor)

    # then: failed with the server's reason; the source still names blue, which still works
    db_secret.refresh_from_db()
    assert run.state == "failed"
    assert "login as" in run.last_error and "permission denied" in run.last_error
    assert file_source.read("payments/db").version == before.version
    with connect_as(app_db, json.loads(before.value)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert db_secret.status == "failed" and steps(run)["rotate.login"] == "pending"
    assert mailoutbox == [] or all("password" not in m.body.lower() for m in mailoutbox)


def test_an_admin_role_without_createrole_is_refused_before_anything_changes(
    app_db, file_source, system_actor
):
    file_source.write("x/db", json.dumps({"username": app_db["blue"], "password": "initial-" + app_db["blue"]}))
    secret = services.register_secret(
        name="weak-admin", secret_type="database_credential", source="file", path="x/db", actor=system_actor,
        config={"host": "127.0.0.1", "dbname": app_db["db"], "usernames": [app_db["blue"], app_db["green"]],
                "admin_dsn": f"host=127.0.0.1 user={app_db['green']} dbname=postgres"},
    )
    run = rotate(secret, actor=system_actor)
    assert run.state == "failed" and "lacks CREATEROLE" in run.last_error
    assert file_source.read("x/db").version == "1"


def single_user_secret(app_db, file_source, actor):
    """``solo-db``: blue alone (``mode: single``), holding its initial password."""
    role = app_db["blue"]
    file_source.write("solo/db", json.dumps({"username": role, "password": "initial-" + role}))
    return services.register_secret(
        name="solo-db", secret_type="database_credential", source="file", path="solo/db", actor=actor,
        config={"host": "127.0.0.1", "dbname": app_db["db"], "mode": "single", "username": role, "admin_dsn": ADMIN_DSN},
    )


def test_single_user_mode_changes_the_one_role_and_rollback_gives_the_old_password_back(
    app_db, admin, file_source, system_actor
):
    role = app_db["blue"]
    secret = single_user_secret(app_db, file_source, system_actor)
    run = rotate(secret, actor=system_actor)
    new = json.loads(file_source.read("solo/db").value)
    assert run.state == "retiring"
    assert stored_matches(admin, role, new["password"]) and not stored_matches(admin, role, "initial-" + role)

    services.rollback(run, actor=system_actor, reason="app could not reconnect")
    run.refresh_from_db()
    restored = json.loads(file_source.read("solo/db").value)
    assert run.state == "rolled_back" and restored["password"] == "initial-" + role
    assert stored_matches(admin, role, "initial-" + role)


def test_scram_verifier_matches_only_its_password():
    verifier = scram_verifier("s3cret-value")
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    assert scram_matches(verifier, "s3cret-value")
    assert not scram_matches(verifier, "s3cret-valuf")
    assert not scram_matches("md5abcdef", "s3cret-value") and not scram_matches(None, "x")


def test_config_with_a_password_in_the_admin_dsn_is_refused(file_source, system_actor):
    with pytest.raises(SecretConfigError, match="must not contain a password"):
        services.register_secret(
            name="leaky", secret_type="database_credential", source="file", path="l/db", actor=system_actor,
            config={"host": "h", "dbname": "d", "usernames": ["a", "b"], "admin_dsn": "host=h user=postgres password=pw"},
        )
    with pytest.raises(ValidationError, match="admin_password"):
        services.register_secret(
            name="leaky2", secret_type="database_credential", source="file", path="l/db", actor=system_actor,
            config={"host": "h", "dbname": "d", "usernames": ["a", "b"], "admin_dsn": "host=h", "admin_password": "pw"},
        )


def _failed_after_retirement(run, *, now):
    """Retire ``run`` at PostgreSQL, then leave it failed, as a crash between the retirement and its record does."""
    services.execute_run(run.pk, now=now)
    run.refresh_from_db()
    assert run.state == "completed" and run.executor_state.get("retired")
    RotationRun.objects.filter(pk=run.pk).update(state="failed", last_error="worker lost after retirement")
    run.refresh_from_db()
    return run


def test_rollback_after_retire_password_is_refused_and_changes_nothing(app_db, admin, file_source, system_actor):
    # given: the secret retires old roles by scrambling their password, and a run got past retirement
    db_secret = _register_db_secret(app_db, file_source, system_actor, retire="password")
    t0 = timezone.now()
    run = rotate(db_secret, actor=system_actor, now=t0)
    run = _failed_after_retirement(run, now=t0 + timedelta(hours=2))
    before = file_source.read("payments/db")
    assert not stored_matches(admin, app_db["blue"], "initial-" + app_db["blue"])

    # when / then: rolling back is refused with a typed error naming what happened
    with pytest.raises(CredentialRetired, match="retire: password"):
        services.rollback(run, actor=system_actor, reason="app errors")
    run.refresh_from_db()
    after = file_source.read("payments/db")
    assert run.state == "failed"
    assert (after.version, after.value) == (before.version, before.value)
    assert json.loads(after.value)["username"] == app_db["green"]


def test_rollback_after_retire_nologin_lets_the_old_role_log_in_again(
    db_secret, app_db, admin, file_source, system_actor
):
    # given: the default retire mode (NOLOGIN), and a run that got past retirement
    t0 = timezone.now()
    run = rotate(db_secret, actor=system_actor, now=t0)
    run = _failed_after_retirement(run, now=t0 + timedelta(hours=2))
    assert not can_login(admin, app_db["blue"])

    # when: rolled back
    services.rollback(run, actor=system_actor, reason="app errors")
    run.refresh_from_db()

    # then: the source names blue again, and blue really logs in with that password
    restored = json.loads(file_source.read("payments/db").value)
    assert run.state == "rolled_back"
    assert restored["username"] == app_db["blue"] and can_login(admin, app_db["blue"])
    assert stored_matches(admin, app_db["blue"], restored["password"])
    with connect_as(app_db, restored) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (app_db["blue"],)


# -- issue 15: the emergency variant ends the sessions opened with the leaked credential ---------------------


def session_is_open(conn) -> bool:
    try:
        return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def test_an_emergency_run_locks_the_leaked_role_and_ends_its_open_sessions_at_once(
    db_secret, app_db, admin, file_source, system_actor
):
    # given: two sessions opened with the (leaked) blue credential, e.g. one of them an attacker's
    before = json.loads(file_source.read("payments/db").value)
    leaked = [connect_as(app_db, before), connect_as(app_db, before)]

    # when: an emergency rotation runs (no grace period)
    run = rotate(db_secret, actor=system_actor, kind="emergency", incident_ref="INC-15")
    after = json.loads(file_source.read("payments/db").value)

    # then: green is active, blue can no longer log in, and both blue sessions are gone
    assert run.state == "completed", run.last_error
    assert after["username"] == app_db["green"] and not can_login(admin, app_db["blue"])
    assert [session_is_open(conn) for conn in leaked] == [False, False]
    assert admin.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", [app_db["blue"]]).fetchone() == (0,)
    step = run.steps.get(key="retire.sessions")
    assert step.status == "done" and step.evidence.startswith("2 session(s) of " + app_db["blue"])
    with connect_as(app_db, after) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (app_db["green"],)
    for conn in leaked:
        conn.close()


def test_a_planned_retirement_leaves_open_sessions_unless_configured_to_end_them(
    db_secret, app_db, admin, file_source, system_actor
):
    before = json.loads(file_source.read("payments/db").value)
    t0 = timezone.now()

    # given: the default (end sessions only in an emergency), and a session on blue
    kept = connect_as(app_db, before)
    run = rotate(db_secret, actor=system_actor, now=t0)
    services.execute_run(run.pk, now=t0 + timedelta(hours=2))
    run.refresh_from_db()
    # then: a planned retirement locks blue but does not cut its open session
    assert run.state == "completed" and not can_login(admin, app_db["blue"]) and session_is_open(kept)
    kept.close()

    # given: terminate_sessions: always, and a session on green (active now)
    # (set directly: through update_secret it is a re-pointing, whose next run needs an approver)
    ManagedSecret.objects.filter(pk=db_secret.pk).update(config={**db_secret.config, "terminate_sessions": "always"})
    db_secret.refresh_from_db()
    active = json.loads(file_source.read("payments/db").value)
    ended = connect_as(app_db, active)
    run2 = rotate(db_secret, actor=system_actor, now=t0 + timedelta(days=1))
    services.execute_run(run2.pk, now=t0 + timedelta(days=1, hours=2))
    run2.refresh_from_db()
    # then: the planned retirement of green ends its session too
    assert run2.state == "completed", run2.last_error
    assert not session_is_open(ended) and run2.steps.get(key="retire.sessions").status == "done"
    ended.close()


def test_an_emergency_single_user_rotation_ends_only_sessions_older_than_the_new_password(
    app_db, admin, file_source, system_actor
):
    role = app_db["blue"]
    secret = single_user_secret(app_db, file_source, system_actor)
    old = connect_as(app_db, {"username": role, "password": "initial-" + role})

    run = rotate(secret, actor=system_actor, kind="emergency", incident_ref="INC-16")

    assert run.state == "completed", run.last_error
    assert not session_is_open(old)
    evidence = run.steps.get(key="retire.sessions").evidence
    assert evidence.startswith(f"1 session(s) of {role} that began before its password changed")
    with connect_as(app_db, json.loads(file_source.read("solo/db").value)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    old.close()


def test_an_admin_role_that_may_not_end_sessions_makes_the_run_wait_for_a_person(
    app_db, admin, file_source, system_actor
):
    # given: an admin role with CREATEROLE but neither superuser nor pg_signal_backend
    weak = app_db["db"] + "_admin"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE").format(sql.Identifier(weak)))
    try:
        file_source.write("w/db", json.dumps({"username": app_db["blue"], "password": "initial-" + app_db["blue"]}))
        secret = services.register_secret(
            name="weak-signal", secret_type="database_credential", source="file", path="w/db", actor=system_actor,
            config={"host": "127.0.0.1", "dbname": app_db["db"], "usernames": [app_db["blue"], app_db["green"]],
                    "admin_dsn": f"host=127.0.0.1 user={weak} dbname=postgres"},
        )
        leaked = connect_as(app_db, {"username": app_db["blue"], "password": "initial-" + app_db["blue"]})

        # when: the emergency run reaches retirement
        run = rotate(secret, actor=system_actor, kind="emergency", incident_ref="INC-17")

        # then: blue is locked, its session still open, and the run waits for a superuser's manual step
        assert run.state == "retiring" and run.paused_reason.startswith("waiting for a person")
        assert "pg_terminate_backend" in run.paused_reason and not can_login(admin, app_db["blue"])
        assert session_is_open(leaked)

        # when: a superuser ends it by hand and ticks the step
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [app_db["blue"]])
        services.tick_manual_step(run, "sessions.manual", actor=system_actor, evidence="ended 1 session as postgres")
        run = services.drive(run.pk)

        # then: the run completes
        assert run.state == "completed", run.last_error
        assert not session_is_open(leaked)
        leaked.close()
    finally:
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(weak)))
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(weak)))
