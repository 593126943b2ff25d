"""Who may open and use each console URL, as a table: add a row when you add a URL.

Every row is requested by each role (users in the role groups, never superusers):
anonymous must be sent to the login page, auditors read everything and act on
nothing (except verifying the audit chain), operators may rotate, key
administrators may do every key action. Nobody adds, changes or deletes data keys
or audit events (key administrators may only destroy a data key another one has
replaced, through the key services), and no role manages users.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.core.cache import cache
from django.urls import reverse

from tests.keyvault import ROLES, World, build_world, make_role_user, use_temp_keyring

LOGIN = "login"  # expected: a redirect to the login page

VIEW = {"anonymous": LOGIN, "auditor": 200, "operator": 200, "administrator": 200}
ADMIN_GET = {"anonymous": LOGIN, "auditor": 403, "operator": 403, "administrator": 200}
ADMIN_POST = {"anonymous": LOGIN, "auditor": 403, "operator": 403, "administrator": 302}
OPERATOR_GET = {"anonymous": LOGIN, "auditor": 403, "operator": 200, "administrator": 200}
OPERATOR_POST = {"anonymous": LOGIN, "auditor": 403, "operator": 302, "administrator": 302}
AUDITOR_GET = {"anonymous": LOGIN, "auditor": 200, "operator": 403, "administrator": 200}
AUDITOR_POST = {"anonymous": LOGIN, "auditor": 302, "operator": 403, "administrator": 302}
NOBODY = {"anonymous": LOGIN, "auditor": 403, "operator": 403, "administrator": 403}
#: Allowed, but there is nothing to do: sent back with a message.
OPERATOR_REDIRECT = {"anonymous": LOGIN, "auditor": 403, "operator": 302, "administrator": 302}
#: Allowed to ask, but the form refuses the request (200 with an error).
OPERATOR_FORM_ERROR = {"anonymous": LOGIN, "auditor": 403, "operator": 200, "administrator": 200}


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    url: Callable[[World], str]
    expect: dict[str, int | str]
    data: Callable[[World], dict] = lambda world: {}


@dataclass(frozen=True)
class admin_url:  # noqa: N801 - reads as a function in the table
    """``admin:<name>`` reversed with arguments taken from the world when called."""

    name: str
    args: tuple = ()

    def __init__(self, name: str, *args) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "args", args)

    def __call__(self, world: World) -> str:
        return reverse(f"admin:{self.name}", args=[arg(world) if callable(arg) else arg for arg in self.args])


@dataclass(frozen=True)
class site_url:  # noqa: N801 - reads as a function in the table
    """A URL outside the admin namespace (``keyvault/urls.py``), reversed by ``name``."""

    name: str
    query: str = ""

    def __call__(self, world: World) -> str:
        return reverse(self.name) + self.query


#: /metrics answers 401 (not a login redirect): scrapers cannot follow one.
METRICS = {"anonymous": 401, "auditor": 200, "operator": 200, "administrator": 200}

#: Report exports answer the download itself (200); the SIEM endpoint knows only bearer tokens (401).
EXPORT_POST = {"anonymous": LOGIN, "auditor": 200, "operator": 403, "administrator": 200}
ADMIN_POST_PAGE = {"anonymous": LOGIN, "auditor": 403, "operator": 403, "administrator": 200}
TOKEN_ONLY = {"anonymous": 401, "auditor": 401, "operator": 401, "administrator": 401}


class named_url(admin_url):  # noqa: N801 - a non-admin URL with arguments (reports)
    def __call__(self, world: World) -> str:
        return reverse(self.name, args=[arg(world) if callable(arg) else arg for arg in self.args])


def siem_consumer(world):
    from keyvault.audit import siem

    return siem.create_consumer(name="matrix", actor=siem.Actor.system("tests"))[0].pk


def api_client(world):
    from keyvault.api import services as api_services
    from keyvault.audit import Actor

    return api_services.create_client(name="matrix-app", actor=Actor.system("tests"), keks=["alpha"],
                                      operations=["unwrap"])[0].pk


def a_user(world):
    from django.contrib.auth.models import User

    return User.objects.get_or_create(username="victor", defaults={"is_staff": True})[0].pk


def totp_device(world):
    from keyvault.access import accounts
    from keyvault.audit import Actor
    from keyvault.models import TOTPDevice

    existing = TOTPDevice.objects.filter(user__username="victor").first()
    if existing is None:
        from django.contrib.auth.models import User

        existing = accounts.create_device(User.objects.get(pk=a_user(world)), actor=Actor.system("tests"))
    return existing.pk


def managed_secret(world):
    from keyvault.audit import Actor
    from keyvault.models import ManagedSecret
    from rotation import services

    existing = ManagedSecret.objects.filter(name="matrix-secret").first()
    if existing is None:
        existing = services.register_secret(name="matrix-secret", secret_type="generic", source="file",
                                            path="matrix-secret", actor=Actor.system("tests"), inspect=False)
    return existing.pk


def alpha(world):
    return world.alpha.pk


def bravo(world):
    return world.bravo.pk


def charlie(world):
    return world.charlie.pk


def data_key(world):
    return world.data_key.pk


def destroy_data_key_form(world) -> dict:
    """A valid destroy request: a newer data key of the same owner is made to replace the world's one."""
    from keyvault.audit import Actor
    from keyvault.keys import services

    replacement, plain = services.create_data_key(world.alpha, actor=Actor.system("tests"),
                                                  owner_ref=world.data_key.owner_ref, encryption_context={"table": "card"})
    with plain:
        return {"replaced_by": str(replacement.pk), "reason": "matrix", "confirm": str(world.data_key.pk)}


def first_event(world):
    from keyvault.models import AuditEvent

    return AuditEvent.objects.order_by("sequence").values_list("pk", flat=True).first()


def checkpoint(world):
    from keyvault import audit

    return audit.checkpoint(actor=audit.Actor.system("tests")).pk


def kek_settings(world):
    return {
        "description": "changed by the matrix",
        "max_encryptions_per_version": "",
        "versions-TOTAL_FORMS": "0",
        "versions-INITIAL_FORMS": "0",
        "versions-MIN_NUM_FORMS": "0",
        "versions-MAX_NUM_FORMS": "0",
    }


# -- rotation runs and policies: made on demand, one world per (row, role) ----------


def pending_run(world):
    """A run of alpha waiting for one approval, started by the system (so anyone may approve it)."""
    if not hasattr(world, "pending_run"):
        from keyvault.audit import Actor
        from rotation import services as rotation

        rotation.update_policy(world.alpha, actor=Actor.system("tests"), approvals_required=1)
        world.pending_run = rotation.start_run(kek=world.alpha, actor=Actor.system("matrix"), reason="matrix")
    return world.pending_run.pk


def retiring_run(world):
    """A run of alpha that rewrapped everything and waits for its grace period (it can be rolled back)."""
    from keyvault.audit import Actor
    from rotation import services as rotation

    run = rotation.start_run(kek=world.alpha, actor=Actor.system("matrix"), reason="matrix")
    return rotation.drive(run.pk).pk


def failed_run(world):
    """A run that failed: its KEK was disabled before the worker got to it."""
    from keyvault.audit import Actor
    from keyvault.keys import services
    from rotation import services as rotation

    echo = services.create_kek(name="echo", actor=Actor.system("tests"))
    run = rotation.start_run(kek=echo, actor=Actor.system("matrix"), reason="matrix")
    services.disable_kek(echo, actor=Actor.system("tests"), reason="matrix")
    return rotation.drive(run.pk).pk


def alpha_policy(world):
    from rotation import services as rotation

    return rotation.ensure_policy(world.alpha).pk


def migration_destination(world):
    from keyvault.audit import Actor
    from keyvault.keys import services

    return {"destination": str(services.create_kek(name="delta", actor=Actor.system("tests")).pk), "reason": "matrix"}


def local_rate_limit(world):
    from keyvault.audit import Actor
    from rotation import services as rotation

    if not hasattr(world, "local_rate_limit"):
        world.local_rate_limit = rotation.set_rate_limit("local", 300, actor=Actor.system("matrix"))
    return world.local_rate_limit.pk


def policy_settings(world):
    return {"period": "90d", "grace_period": "7d", "approvals_required": "1", "auto": "on", "usage_threshold": "",
            "window_weekdays": "", "window_start": "", "window_end": ""}


MATRIX: tuple[Row, ...] = (
    # pages
    Row("index", "GET", admin_url("index"), VIEW),
    Row("app index", "GET", admin_url("app_list", "keyvault"), VIEW),
    Row("KEK list", "GET", admin_url("keyvault_keyencryptionkey_changelist"), VIEW),
    Row("KEK page", "GET", admin_url("keyvault_keyencryptionkey_change", alpha), VIEW),
    Row("KEK history", "GET", admin_url("keyvault_keyencryptionkey_history", alpha), VIEW),
    Row("data key list", "GET", admin_url("keyvault_datakey_changelist"), VIEW),
    Row("data key page", "GET", admin_url("keyvault_datakey_change", data_key), VIEW),
    Row("audit log", "GET", admin_url("keyvault_auditevent_changelist"), VIEW),
    Row("audit event page", "GET", admin_url("keyvault_auditevent_change", first_event), VIEW),
    Row("checkpoint list", "GET", admin_url("keyvault_auditcheckpoint_changelist"), VIEW),
    Row("checkpoint page", "GET", admin_url("keyvault_auditcheckpoint_change", checkpoint), VIEW),
    # KEK actions
    Row("KEK settings", "POST", admin_url("keyvault_keyencryptionkey_change", alpha), ADMIN_POST, kek_settings),
    Row("create KEK form", "GET", admin_url("keyvault_keyencryptionkey_add"), ADMIN_GET),
    Row("create KEK", "POST", admin_url("keyvault_keyencryptionkey_add"), ADMIN_POST,
        lambda w: {"name": "delta", "provider": "local", "rotation_period_days": "30"}),
    Row("rotate form", "GET", admin_url("keyvault_keyencryptionkey_rotate", alpha), OPERATOR_GET),
    Row("rotate", "POST", admin_url("keyvault_keyencryptionkey_rotate", alpha), OPERATOR_POST,
        lambda w: {"reason": "matrix"}),
    Row("disable form", "GET", admin_url("keyvault_keyencryptionkey_disable", alpha), ADMIN_GET),
    Row("disable", "POST", admin_url("keyvault_keyencryptionkey_disable", alpha), ADMIN_POST),
    Row("enable form", "GET", admin_url("keyvault_keyencryptionkey_enable", bravo), ADMIN_GET),
    Row("enable", "POST", admin_url("keyvault_keyencryptionkey_enable", bravo), ADMIN_POST),
    Row("schedule deletion form", "GET", admin_url("keyvault_keyencryptionkey_schedule_deletion", alpha), ADMIN_GET),
    Row("schedule deletion", "POST", admin_url("keyvault_keyencryptionkey_schedule_deletion", alpha), ADMIN_POST,
        lambda w: {"waiting_days": "7", "confirm_name": "alpha"}),
    Row("cancel deletion form", "GET", admin_url("keyvault_keyencryptionkey_cancel_deletion", charlie), ADMIN_GET),
    Row("cancel deletion", "POST", admin_url("keyvault_keyencryptionkey_cancel_deletion", charlie), ADMIN_POST),
    Row("retire version form", "GET", admin_url("keyvault_keyencryptionkey_retire_version", alpha, 1), ADMIN_GET),
    Row("retire version", "POST", admin_url("keyvault_keyencryptionkey_retire_version", alpha, 1), ADMIN_POST,
        lambda w: {"state": "disabled", "reason": "matrix"}),
    Row("delete KEK", "GET", admin_url("keyvault_keyencryptionkey_delete", alpha), NOBODY),
    Row("delete KEK (POST)", "POST", admin_url("keyvault_keyencryptionkey_delete", alpha), NOBODY,
        lambda w: {"post": "yes"}),
    # audit log
    Row("verify chain form", "GET", admin_url("keyvault_auditevent_verify"), AUDITOR_GET),
    Row("verify chain", "POST", admin_url("keyvault_auditevent_verify"), AUDITOR_POST),
    Row("add audit event", "GET", admin_url("keyvault_auditevent_add"), NOBODY),
    Row("change audit event", "POST", admin_url("keyvault_auditevent_change", first_event), NOBODY,
        lambda w: {"actor": "user:mallory"}),
    Row("delete audit event", "POST", admin_url("keyvault_auditevent_delete", first_event), NOBODY,
        lambda w: {"post": "yes"}),
    # data keys are made by the API and the CLI, never edited by hand
    Row("add data key", "GET", admin_url("keyvault_datakey_add"), NOBODY),
    Row("change data key", "POST", admin_url("keyvault_datakey_change", data_key), NOBODY,
        lambda w: {"purpose": "tampered"}),
    Row("delete data key", "GET", admin_url("keyvault_datakey_delete", data_key), NOBODY),
    # ... except that key administrators destroy a superseded one, through the key services (kms destroy-data-key)
    Row("destroy data key form", "GET", admin_url("keyvault_datakey_destroy", data_key), ADMIN_GET),
    Row("destroy data key", "POST", admin_url("keyvault_datakey_destroy", data_key), ADMIN_POST, destroy_data_key_form),
    # KMS providers and metrics
    Row("providers page", "GET", site_url("keyvault_providers"), VIEW),
    Row("metrics", "GET", site_url("metrics"), METRICS),
    # issue 16: global search (each kind filtered by view permission) and the user's own preferences
    Row("global search", "GET", site_url("console-search", "?q=matrix"), VIEW),
    Row("preferences page", "GET", site_url("console-preferences"), VIEW),
    # auditors and administrators get the CSV; an operator is not offered the action and gets the list again
    # (tests/keyvault/console/test_selection.py tells the two 200s apart)
    Row("export selected KEKs", "POST", admin_url("keyvault_keyencryptionkey_changelist"),
        {"anonymous": LOGIN, "auditor": 200, "operator": 200, "administrator": 200}, lambda w: {"action": "export_selected_csv", "_selected_action": [w.alpha.pk]}),
    Row("set own time zone", "POST", site_url("console-preferences"),
        {"anonymous": LOGIN, "auditor": 302, "operator": 302, "administrator": 302},
        lambda w: {"time_zone": "Europe/Berlin"}),
    # hardening: the health probe is open; two-factor enrolment needs a password login first
    Row("healthz", "GET", site_url("healthz"), {"anonymous": 200, "auditor": 200, "operator": 200,
                                                "administrator": 200}),
    Row("2FA enrolment", "GET", site_url("otp-enrol"), VIEW),
    Row("2FA token form", "GET", site_url("otp-verify"), {"anonymous": LOGIN, "auditor": 302, "operator": 302,
                                                          "administrator": 302}),  # no device yet: to enrol
    # rotation: runs are started from the KEK page, driven from the run page
    Row("emergency rotate form", "GET", admin_url("keyvault_keyencryptionkey_emergency_rotate", alpha), ADMIN_GET),
    Row("emergency rotate", "POST", admin_url("keyvault_keyencryptionkey_emergency_rotate", alpha), ADMIN_POST,
        lambda w: {"incident_ref": "INC-1", "reason": "matrix"}),
    Row("migrate form", "GET", admin_url("keyvault_keyencryptionkey_migrate", alpha), ADMIN_GET),
    Row("migrate", "POST", admin_url("keyvault_keyencryptionkey_migrate", alpha), ADMIN_POST, migration_destination),
    Row("rotation app index", "GET", admin_url("app_list", "rotation"), VIEW),
    Row("run list", "GET", admin_url("rotation_rotationrun_changelist"), VIEW),
    Row("export selected runs", "POST", admin_url("rotation_rotationrun_changelist"),
        {"anonymous": LOGIN, "auditor": 200, "operator": 200, "administrator": 200},
        lambda w: {"action": "export_selected_csv", "_selected_action": [pending_run(w)]}),
    Row("run page", "GET", admin_url("rotation_rotationrun_change", pending_run), VIEW),
    Row("run page (POST)", "POST", admin_url("rotation_rotationrun_change", pending_run), NOBODY,
        lambda w: {"state": "completed"}),
    Row("run history", "GET", admin_url("rotation_rotationrun_history", pending_run), VIEW),
    Row("run progress", "GET", admin_url("rotation_rotationrun_progress", pending_run), VIEW),
    Row("approve form", "GET", admin_url("rotation_rotationrun_approve", pending_run), OPERATOR_GET),
    Row("approve", "POST", admin_url("rotation_rotationrun_approve", pending_run), OPERATOR_POST,
        lambda w: {"decision": "approve", "comment": "matrix"}),
    Row("tick step form", "GET", admin_url("rotation_rotationrun_tick", pending_run, "precheck.owners"), OPERATOR_GET),
    Row("tick step", "POST", admin_url("rotation_rotationrun_tick", pending_run, "precheck.owners"), OPERATOR_POST,
        lambda w: {"evidence": "told the owners"}),
    Row("cancel run form", "GET", admin_url("rotation_rotationrun_cancel", pending_run), ADMIN_GET),
    Row("cancel run", "POST", admin_url("rotation_rotationrun_cancel", pending_run), ADMIN_POST,
        lambda w: {"reason": "matrix"}),
    Row("roll back run form", "GET", admin_url("rotation_rotationrun_rollback", retiring_run), ADMIN_GET),
    Row("roll back run", "POST", admin_url("rotation_rotationrun_rollback", retiring_run), ADMIN_POST,
        lambda w: {"reason": "matrix"}),
    Row("resume run form", "GET", admin_url("rotation_rotationrun_resume", failed_run), ADMIN_GET),
    Row("resume run", "POST", admin_url("rotation_rotationrun_resume", failed_run), ADMIN_POST),
    Row("add run", "GET", admin_url("rotation_rotationrun_add"), NOBODY),
    Row("delete run", "POST", admin_url("rotation_rotationrun_delete", pending_run), NOBODY, lambda w: {"post": "yes"}),
    Row("policy list", "GET", admin_url("rotation_rotationpolicy_changelist"), VIEW),
    Row("policy page", "GET", admin_url("rotation_rotationpolicy_change", alpha_policy), VIEW),
    Row("policy change", "POST", admin_url("rotation_rotationpolicy_change", alpha_policy), ADMIN_POST, policy_settings),
    Row("add policy", "GET", admin_url("rotation_rotationpolicy_add"), NOBODY),
    Row("rate limit list", "GET", admin_url("rotation_providerratelimit_changelist"), VIEW),
    Row("rate limit page", "GET", admin_url("rotation_providerratelimit_change", local_rate_limit), VIEW),
    Row("rate limit change", "POST", admin_url("rotation_providerratelimit_change", local_rate_limit), ADMIN_POST,
        lambda w: {"provider": "local", "cap": "200"}),
    Row("add rate limit form", "GET", admin_url("rotation_providerratelimit_add"), ADMIN_GET),
    Row("add rate limit", "POST", admin_url("rotation_providerratelimit_add"), ADMIN_POST,
        lambda w: {"provider": "local", "cap": "100"}),
    Row("delete rate limit", "POST", admin_url("rotation_providerratelimit_delete", local_rate_limit), NOBODY,
        lambda w: {"post": "yes"}),
    Row("delete policy", "POST", admin_url("rotation_rotationpolicy_delete", alpha_policy), NOBODY,
        lambda w: {"post": "yes"}),
    # reports and SIEM consumers (keyvault.console.report_views, keyvault.audit.siem)
    Row("reports", "GET", named_url("reports:index"), VIEW),
    Row("report page", "GET", named_url("reports:report", "rotations"), VIEW),
    Row("report export", "POST", named_url("reports:export", "rotations", "csv"), EXPORT_POST),
    Row("SIEM consumer list", "GET", admin_url("keyvault_siemconsumer_changelist"), VIEW),
    Row("SIEM consumer page", "GET", admin_url("keyvault_siemconsumer_change", siem_consumer), VIEW),
    Row("add SIEM consumer form", "GET", admin_url("keyvault_siemconsumer_add"), ADMIN_GET),
    Row("add SIEM consumer", "POST", admin_url("keyvault_siemconsumer_add"), ADMIN_POST_PAGE,
        lambda w: {"name": "collector"}),
    Row("deactivate SIEM consumer", "POST", admin_url("keyvault_siemconsumer_change", siem_consumer), ADMIN_POST),
    Row("SIEM events without a token", "GET", site_url("siem-events"), TOKEN_ONLY),
    # application API clients (keyvault.console.api_admin); the API itself: tests/keyvault/api/test_authorisation.py
    Row("API client list", "GET", admin_url("keyvault_apiclient_changelist"), VIEW),
    Row("API client page", "GET", admin_url("keyvault_apiclient_change", api_client), VIEW),
    Row("add API client form", "GET", admin_url("keyvault_apiclient_add"), ADMIN_GET),
    Row("add API client", "POST", admin_url("keyvault_apiclient_add"), ADMIN_POST_PAGE,
        lambda w: {"name": "app", "keks": ["alpha"], "operations": ["unwrap"], "rate_limit_per_second": "10"}),
    Row("rotate API client token form", "GET", admin_url("keyvault_apiclient_rotate_token", api_client), ADMIN_GET),
    Row("rotate API client token", "POST", admin_url("keyvault_apiclient_rotate_token", api_client),
        ADMIN_POST_PAGE, lambda w: {"overlap_hours": "1"}),
    Row("revoke API client form", "GET", admin_url("keyvault_apiclient_revoke", api_client), ADMIN_GET),
    Row("revoke API client", "POST", admin_url("keyvault_apiclient_revoke", api_client), ADMIN_POST,
        lambda w: {"reason": "matrix"}),
    Row("API without a token", "GET", site_url("api-v1:list_keks"), TOKEN_ONLY),
    # managed secrets (keyvault.console.secrets_admin)
    Row("secret list", "GET", admin_url("keyvault_managedsecret_changelist"), VIEW),
    Row("secret page", "GET", admin_url("keyvault_managedsecret_change", managed_secret), VIEW),
    Row("add secret form", "GET", admin_url("keyvault_managedsecret_add"), ADMIN_GET),
    Row("rotate secret form", "GET", admin_url("keyvault_managedsecret_rotate", managed_secret), OPERATOR_GET),
    Row("rotate secret", "POST", admin_url("keyvault_managedsecret_rotate", managed_secret), OPERATOR_POST,
        lambda w: {"kind": "on_demand", "reason": "matrix"}),
    # issue 12 #6: an emergency rotation (no grace period) needs the emergency permission, as for a KEK
    Row("emergency rotate secret", "POST", admin_url("keyvault_managedsecret_rotate", managed_secret), ADMIN_POST,
        lambda w: {"kind": "emergency", "incident_ref": "INC-1", "reason": "matrix"}),
    # kinds the secret page does not offer: a form error for those who may rotate, never a run
    Row("planned rotate secret (not offered)", "POST", admin_url("keyvault_managedsecret_rotate", managed_secret),
        OPERATOR_FORM_ERROR, lambda w: {"kind": "planned", "reason": "matrix"}),
    Row("migrate secret (not offered)", "POST", admin_url("keyvault_managedsecret_rotate", managed_secret),
        OPERATOR_FORM_ERROR, lambda w: {"kind": "migrate", "reason": "matrix"}),
    Row("provide secret value (no run waiting)", "GET",
        admin_url("keyvault_managedsecret_provide_value", managed_secret), OPERATOR_REDIRECT),
    # no role manages users: that is for the bootstrap superuser
    Row("user list", "GET", admin_url("auth_user_changelist"), NOBODY),
    Row("group list", "GET", admin_url("auth_group_changelist"), NOBODY),
    # issue 12 #4: granting rights is for the superuser only, whatever the role (and audited when done)
    Row("make a user superuser", "POST", admin_url("auth_user_change", a_user), NOBODY,
        lambda w: {"username": "victor", "is_active": "on", "is_staff": "on", "is_superuser": "on"}),
    Row("add a group", "POST", admin_url("auth_group_add"), NOBODY, lambda w: {"name": "Everything"}),
    # issue 12 #9: TOTP devices (secret encrypted) are listed and deleted by the superuser only
    Row("TOTP device list", "GET", admin_url("keyvault_totpdevice_changelist"), NOBODY),
    Row("TOTP device page", "GET", admin_url("keyvault_totpdevice_change", totp_device), NOBODY),
    Row("delete TOTP device", "POST", admin_url("keyvault_totpdevice_delete", totp_device), NOBODY,
        lambda w: {"post": "yes"}),
    Row("reset TOTP throttling", "POST", admin_url("keyvault_totpdevice_changelist"), NOBODY,
        lambda w: {"action": "reset_throttle", "_selected_action": [totp_device(w)]}),
)


@pytest.fixture(autouse=True)
def _isolated(settings, tmp_path):
    use_temp_keyring(settings, tmp_path)
    cache.clear()


@pytest.mark.django_db
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("row", MATRIX, ids=lambda row: f"{row.method} {row.name}")
def test_console_url_answers_each_role_as_expected(client, row, role):
    # given the keys every action needs and a user in the role
    world = build_world()
    if role != "anonymous":
        client.force_login(make_role_user(role))
    url = row.url(world)

    # when the role requests the URL
    if row.method == "GET":
        response = client.get(url)
    else:
        response = client.post(url, row.data(world))

    # then it gets the expected answer
    expected = row.expect[role]
    if expected == LOGIN:
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("admin:login") + "?next=")
    else:
        assert response.status_code == expected, f"{row.method} {url} as {role}"
        if expected == 302:  # a successful action redirects to its result, never back to login
            assert not response["Location"].startswith(reverse("admin:login"))


def test_every_console_route_of_ours_is_in_the_matrix():
    """A new custom view must get a row here before it ships."""
    from django.contrib import admin

    from keyvault.console.admin_views import kek_actions
    from rotation.admin_views import RUN_CONTROLS

    covered = {row.url.name for row in MATRIX}
    ours = {f"{action.url_name}" for action in kek_actions()}
    ours |= {"keyvault_keyencryptionkey_retire_version", "keyvault_auditevent_verify", "keyvault_datakey_destroy",
             "keyvault_keyencryptionkey_add", "keyvault_providers", "metrics"}
    ours |= {"console-search", "console-preferences"}
    ours |= {"keyvault_apiclient_add", "keyvault_apiclient_rotate_token", "keyvault_apiclient_revoke",
             "api-v1:list_keks"}
    ours |= {"keyvault_siemconsumer_add", "reports:index", "reports:report", "reports:export", "siem-events"}
    ours |= {"keyvault_managedsecret_add", "keyvault_managedsecret_rotate", "keyvault_managedsecret_provide_value"}
    ours |= {f"rotation_rotationrun_{name}" for name in ("progress", "approve", "tick", *RUN_CONTROLS)}
    for model_admin in admin.site._registry.values():
        if model_admin.opts.app_label in ("keyvault", "rotation"):
            info = (model_admin.opts.app_label, model_admin.opts.model_name)
            ours |= {f"{info[0]}_{info[1]}_changelist", f"{info[0]}_{info[1]}_change"}
    assert ours <= covered, f"no matrix row for {sorted(ours - covered)}"


# -- starting runs: every run kind x target type x role, through the service the console and CLI share ---------

#: Who may start each kind of run on each type of target (the console pages and ``rotation start --user``).
#: "invalid": allowed to ask, but that kind does not apply to the target (a RotationError, not a permission one).
RUN_STARTS: dict[tuple[str, str], dict[str, str]] = {
    ("kek", "on_demand"): {"auditor": "refused", "operator": "allowed", "administrator": "allowed"},
    ("kek", "planned"): {"auditor": "refused", "operator": "allowed", "administrator": "allowed"},
    ("kek", "emergency"): {"auditor": "refused", "operator": "refused", "administrator": "allowed"},
    ("kek", "migrate"): {"auditor": "refused", "operator": "refused", "administrator": "allowed"},
    ("secret", "on_demand"): {"auditor": "refused", "operator": "allowed", "administrator": "allowed"},
    ("secret", "planned"): {"auditor": "refused", "operator": "allowed", "administrator": "allowed"},
    ("secret", "emergency"): {"auditor": "refused", "operator": "refused", "administrator": "allowed"},
    ("secret", "migrate"): {"auditor": "refused", "operator": "refused", "administrator": "invalid"},
}


def test_the_run_start_table_covers_every_kind_and_target():
    from rotation.models import RotationRun

    assert set(RUN_STARTS) == {(target, kind) for target in ("kek", "secret") for kind in RotationRun.Kind.values}


@pytest.mark.django_db
@pytest.mark.parametrize("role", [role for role in ROLES if role != "anonymous"])
@pytest.mark.parametrize("target,kind", sorted(RUN_STARTS))
def test_starting_a_run_answers_each_role_as_expected(target, kind, role):
    from keyvault.audit import Actor
    from rotation import services as rotation
    from rotation.exceptions import RotationError, RunNotPermitted

    # given a KEK (and a destination for migrations) or a managed secret, and a user in the role
    world = build_world()
    user = make_role_user(role)
    target_kwargs = {"kek": world.alpha} if target == "kek" else {"secret": rotation.ManagedSecret.objects.get(
        pk=managed_secret(world))}
    if kind == "migrate" and target == "kek":
        from keyvault.keys import services

        target_kwargs["destination"] = services.create_kek(name="delta", actor=Actor.system("tests"))

    # when the user starts the run, as the console and the CLI do
    try:
        rotation.start_run(**target_kwargs, actor=Actor.user(user), user=user, kind=kind, reason="matrix",
                           incident_ref="INC-1")
        outcome = "allowed"
    except RunNotPermitted:
        outcome = "refused"
    except RotationError:
        outcome = "invalid"

    # then
    assert outcome == RUN_STARTS[(target, kind)][role], f"{kind} run of a {target} by {role}"
