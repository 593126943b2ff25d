"""The security console: pages, custom action views, audit chain banner, big-table paging.

Given keys made through the services, when a role user uses the console, then the
state changes only through the services, each change has its audit event, refused
actions become form errors, and no page ever shows key material.
"""

from __future__ import annotations

import base64
import re
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.core.cache import cache
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from keyvault.audit import Actor
from keyvault.audit import status as audit_status
from keyvault.console.admin import EstimatedCountPaginator
from keyvault.keys import services
from keyvault.models import AuditEvent, AuditVerification, DataKey, KeyEncryptionKey, KeyVersion
from tests.audit_owner import as_table_owner
from rotation import services as rotation
from tests.keyvault import build_world, make_role_user, use_temp_keyring

pytestmark = pytest.mark.django_db

KEK = KeyEncryptionKey


@pytest.fixture(autouse=True)
def _isolated(settings, tmp_path):
    use_temp_keyring(settings, tmp_path)
    cache.clear()


@pytest.fixture
def world():
    return build_world()


def client_as(role: str, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(make_role_user(role))
    return client


@pytest.fixture
def administrator():
    return client_as("administrator")


@pytest.fixture
def operator():
    return client_as("operator")


@pytest.fixture
def auditor():
    return client_as("auditor")


def url(name: str, *args) -> str:
    return reverse(f"admin:{name}", args=args)


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("sequence"))


def page_text(response) -> str:
    return response.content.decode()


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


# -- pages -------------------------------------------------------------------------


def test_kek_list_shows_state_provider_primary_version_due_date_and_data_key_count(administrator, world):
    policy = rotation.ensure_policy(world.alpha)

    response = administrator.get(url("keyvault_keyencryptionkey_changelist"))

    assert response.status_code == 200
    rows = {kek.name: kek for kek in response.context["cl"].result_list}
    assert rows["alpha"].primary_number == 2 and rows["alpha"].dek_count == 2
    assert rows["bravo"].primary_number == 1 and rows["bravo"].dek_count == 0
    assert rows["alpha"].next_due == policy.next_due_at and rows["bravo"].next_due is None  # the policy's date
    html = page_text(response)
    assert 'kv-state-pending_deletion">Pending deletion' in html
    assert f"{policy.next_due_at:%Y}" in html


@pytest.mark.parametrize("order", ["6", "-6", "6.1", "-6.-1"])
def test_kek_list_sorted_by_any_column_index_is_a_page_not_a_500(administrator, world, order):
    # the data-key count is added after the changelist orders its rows: it is not a sort key
    response = administrator.get(url("keyvault_keyencryptionkey_changelist"), {"o": order})

    assert response.status_code == 200
    assert {kek.name for kek in response.context["cl"].result_list} >= {"alpha", "bravo"}


def test_kek_list_query_count_does_not_grow_with_the_number_of_keys(administrator, world):
    # given the three keys of the world, count the queries of one page
    with CaptureQueriesContext(connection) as few:
        administrator.get(url("keyvault_keyencryptionkey_changelist"))
    # when ten more keys exist
    for index in range(10):
        services.create_kek(name=f"extra-{index}", actor=Actor.system("tests"))
    with CaptureQueriesContext(connection) as many:
        response = administrator.get(url("keyvault_keyencryptionkey_changelist"))

    # then the page still takes the same number of queries (counts are annotated, not per row)
    assert response.status_code == 200
    assert len(response.context["cl"].result_list) == 13
    assert len(many.captured_queries) == len(few.captured_queries)


def test_kek_page_shows_versions_and_coverage_of_the_primary(auditor, world):
    services.rotate_kek_version(world.alpha, actor=Actor.system("tests"))
    services.create_data_key(world.alpha, actor=Actor.system("tests"))  # one key on the new primary v3

    response = auditor.get(url("keyvault_keyencryptionkey_change", world.alpha.pk))

    assert response.status_code == 200
    coverage = response.context["coverage"]
    assert [(row.number, row.data_keys, row.is_primary) for row in coverage.rows] == [
        (3, 1, True), (2, 2, False), (1, 0, False)]
    assert coverage.total == 3 and coverage.primary_share == 33.3 and coverage.on_older_versions == 2
    html = page_text(response)
    assert "33.3% of 3 data keys are wrapped by the primary version v3" in html
    # the inline lists every version read-only
    assert html.count('class="kv-state kv-state-enabled"') >= 3
    assert 'name="versions-0-state"' not in html


def test_action_buttons_follow_permissions_and_state(administrator, operator, auditor, world):
    def buttons(client, kek):
        response = client.get(url("keyvault_keyencryptionkey_change", kek.pk))
        return [link.label for link in response.context["kek_actions"]], page_text(response)

    admin_alpha, html = buttons(administrator, world.alpha)
    assert admin_alpha == ["Rotate now", "Emergency rotate", "Migrate to another KEK", "Disable", "Schedule deletion"]
    assert html.count("Retire…") == 1  # v1 only: v2 is primary
    assert 'name="_save"' in html and 'name="_addanother"' not in html  # "add" is the create view
    assert buttons(administrator, world.bravo)[0] == ["Enable", "Schedule deletion"]
    assert buttons(administrator, world.charlie)[0] == ["Cancel deletion"]
    operator_alpha, html = buttons(operator, world.alpha)
    assert operator_alpha == ["Rotate now"]
    assert "Retire…" not in html
    assert buttons(operator, world.bravo)[0] == []
    auditor_alpha, html = buttons(auditor, world.alpha)
    assert auditor_alpha == []
    assert "Rotate now" not in html and "Audit events" in html


def test_data_key_pages_show_a_fingerprint_never_the_wrapped_bytes(auditor, world):
    wrapped = bytes(world.data_key.wrapped_key)

    listing = page_text(auditor.get(url("keyvault_datakey_changelist")))
    detail = page_text(auditor.get(url("keyvault_datakey_change", world.data_key.pk)))

    for html in (listing, detail):
        assert world.data_key.fingerprint in html
        for encoded in encodings(wrapped):
            assert encoded not in html
    assert "&quot;table&quot;: &quot;card&quot;" in detail  # the context, pretty-printed
    assert 'name="wrapped_key"' not in detail


def test_audit_log_is_read_only_even_for_a_superuser(admin_client, world):
    event = AuditEvent.objects.order_by("sequence").first()

    assert admin_client.get(url("keyvault_auditevent_add")).status_code == 403
    assert admin_client.post(url("keyvault_auditevent_change", event.pk), {"actor": "x"}).status_code == 403
    assert admin_client.post(url("keyvault_auditevent_delete", event.pk), {"post": "yes"}).status_code == 403
    assert admin_client.get(url("keyvault_keyencryptionkey_delete", world.alpha.pk)).status_code == 403
    page = page_text(admin_client.get(url("keyvault_auditevent_change", event.pk)))
    assert 'name="actor"' not in page and "Save" not in page
    assert AuditEvent.objects.filter(pk=event.pk, actor=event.actor).exists()


def test_audit_event_page_shows_details_as_pretty_json(auditor, world):
    event = events("kek.disabled")[0]

    html = page_text(auditor.get(url("keyvault_auditevent_change", event.pk)))

    assert '<pre class="kv-json">{\n  &quot;reason&quot;: &quot;setup&quot;\n}</pre>' in html


def test_audit_log_filters_by_actor_action_target_and_date(auditor, world):
    services.rotate_kek_version(world.alpha, actor=Actor(name="user:carol"))
    changelist = url("keyvault_auditevent_changelist")

    def sequences(**params):
        response = auditor.get(changelist, params)
        assert response.status_code == 200
        return [event.sequence for event in response.context["cl"].result_list]

    carol = sequences(actor="user:carol")
    assert len(carol) == 1 and AuditEvent.objects.get(sequence=carol[0]).action == "kek.rotated"
    rotated = sequences(action__exact="kek.rotated")
    assert len(rotated) == 2
    bravo = sequences(target_type="keyencryptionkey", target_id="bravo")
    assert {AuditEvent.objects.get(sequence=s).action for s in bravo} == {"kek.created", "kek.disabled"}
    today = timezone.now().date()
    assert sequences(**{"from": str(today + timedelta(days=1))}) == []
    # "to" as a date includes that whole day
    assert len(sequences(**{"from": str(today), "to": str(today)})) == AuditEvent.objects.count()
    # the input filter keeps the other filters when it is submitted
    html = page_text(auditor.get(changelist, {"action__exact": "kek.rotated"}))
    assert '<input type="hidden" name="action__exact" value="kek.rotated">' in html


# -- creating a KEK ----------------------------------------------------------------


def test_add_is_the_create_view_and_creates_through_the_service(administrator):
    form = administrator.get(url("keyvault_keyencryptionkey_add"))
    assert form.status_code == 200
    assert [choice[0] for choice in form.context["form"].fields["provider"].choices] == ["local"]

    response = administrator.post(url("keyvault_keyencryptionkey_add"), {
        "name": "orders", "provider": "local", "description": "orders table", "rotation_period_days": "90",
        "max_encryptions_per_version": "1000000",
    })

    kek = KEK.objects.get(name="orders")
    assert response.status_code == 302 and response["Location"] == url("keyvault_keyencryptionkey_change", kek.pk)
    assert (kek.provider, kek.max_encryptions_per_version) == ("local", 1_000_000)
    assert (kek.rotation_policy.period, kek.rotation_policy.next_due_at) == (timedelta(days=90),
                                                                            kek.created_at + timedelta(days=90))
    assert list(kek.versions.values_list("number", "is_primary")) == [(1, True)]
    created = events("kek.created")
    assert len(created) == 1 and created[0].actor == "user:administrator" and created[0].target_id == "orders"
    assert created[0].ip_address == "127.0.0.1"
    scheduled = events("rotation.policy_changed")
    assert [(e.actor, e.target_id, e.details["period"]) for e in scheduled] == [
        ("user:administrator", "orders", str(timedelta(days=90)))]
    assert services.provider_for(kek).describe_key(kek.provider_key_id).primary_version == 1


@pytest.mark.parametrize(("data", "field", "message"), [
    ({"name": "alpha"}, "name", "already exists"),
    ({"name": "-leading-hyphen"}, "name", "starting with a letter or digit"),
    ({"provider": "aws"}, "provider", "Select a valid choice"),
    ({"rotation_period_days": "0"}, "rotation_period_days", "greater than or equal to 1"),
    ({"max_encryptions_per_version": str(2**32 + 1)}, "max_encryptions_per_version", "less than or equal to"),
])
def test_create_refuses_bad_input_as_form_errors(administrator, world, data, field, message):
    posted = {"name": "new-key", "provider": "local", "rotation_period_days": "365", **data}

    response = administrator.post(url("keyvault_keyencryptionkey_add"), posted)

    assert response.status_code == 200
    assert message in " ".join(response.context["form"].errors[field])
    assert not events("kek.created")[3:]  # only the world's three keys were created


def test_create_reports_a_provider_error_without_a_500(administrator, settings):
    kms = dict(settings.KMS)
    kms["providers"] = {**settings.KMS["providers"], "local": {**settings.KMS["providers"]["local"],
                                                                "master_key": "not base64 at all"}}
    settings.KMS = kms

    response = administrator.post(url("keyvault_keyencryptionkey_add"), {
        "name": "doomed", "provider": "local", "rotation_period_days": "365"})

    assert response.status_code == 200
    assert "HMD_LOCAL_KMS_MASTER_KEY must be 32 random bytes" in " ".join(response.context["form"].non_field_errors())
    assert not KEK.objects.filter(name="doomed").exists()


# -- the settings form -------------------------------------------------------------


def settings_post(**changes) -> dict:
    data = {"description": "payments database fields",
            "max_encryptions_per_version": "", "versions-TOTAL_FORMS": "0", "versions-INITIAL_FORMS": "0",
            "versions-MIN_NUM_FORMS": "0", "versions-MAX_NUM_FORMS": "0"}
    data.update(changes)
    return data


def test_settings_form_saves_through_the_service_and_ignores_read_only_fields(administrator, world):
    response = administrator.post(url("keyvault_keyencryptionkey_change", world.alpha.pk), settings_post(
        description="card numbers", rotation_period_days="30", name="renamed", state="destroyed",
        provider_key_id="other"))

    assert response.status_code == 302
    kek = KEK.objects.get(pk=world.alpha.pk)
    assert (kek.name, kek.state, kek.provider_key_id) == ("alpha", "enabled", "alpha")
    assert kek.description == "card numbers"
    updated = events("kek.updated")
    assert len(updated) == 1
    assert updated[0].details == {"description": "card numbers"}
    assert updated[0].actor == "user:administrator"
    assert not events("rotation.policy_changed")  # the period posted is no field of the KEK's


def test_settings_form_has_no_schedule_the_rotation_policy_owns_it(administrator, world):
    response = administrator.get(url("keyvault_keyencryptionkey_change", world.alpha.pk))

    assert set(response.context["adminform"].form.fields) == {"description", "max_encryptions_per_version"}


# -- rotate, disable, enable, delete, cancel ----------------------------------------


def test_operator_rotates_a_key(operator, world):
    """Rotate now starts a rotation run (the engine makes the version); the console shows the run."""
    from rotation import services as rotation_services
    from rotation.models import RotationRun

    response = operator.post(url("keyvault_keyencryptionkey_rotate", world.alpha.pk), {"reason": "CHG-42"})

    assert response.status_code == 302
    run = RotationRun.objects.get(kek=world.alpha)
    assert response["Location"] == url("rotation_rotationrun_change", run.pk)
    assert (run.kind, run.state, run.initiator, run.reason) == ("on_demand", "queued", "user:operator", "CHG-42")
    started = events("rotation.started")[-1]
    assert started.actor == "user:operator" and started.details["run_id"] == run.pk
    follow = operator.get(response["Location"])
    assert f"Started run #{run.pk} of alpha" in " ".join(messages_of(follow))

    rotation_services.drive(run.pk)  # the worker's part

    assert KeyVersion.objects.get(kek=world.alpha, is_primary=True).number == 3
    rotated = events("kek.rotated")[-1]
    assert rotated.details["new_version"] == 3 and rotated.details["previous_version"] == 2


def test_rotating_a_disabled_key_is_a_form_error_not_a_500(administrator, world):
    before = AuditEvent.objects.count()

    response = administrator.post(url("keyvault_keyencryptionkey_rotate", world.bravo.pk), {"reason": ""})

    assert response.status_code == 200
    assert "KEK 'bravo' is disabled" in " ".join(response.context["form"].non_field_errors())
    assert "does not apply in that state" in page_text(response)
    assert AuditEvent.objects.count() == before
    assert world.bravo.versions.count() == 1


def test_disable_then_enable(administrator, world):
    administrator.post(url("keyvault_keyencryptionkey_disable", world.alpha.pk), {"reason": "incident 7"})
    assert KEK.objects.get(pk=world.alpha.pk).state == KEK.State.DISABLED
    assert events("kek.disabled")[-1].details == {"reason": "incident 7"}

    response = administrator.post(url("keyvault_keyencryptionkey_enable", world.alpha.pk))

    assert response.status_code == 302
    assert KEK.objects.get(pk=world.alpha.pk).state == KEK.State.ENABLED
    assert events("kek.enabled")[-1].actor == "user:administrator"


def test_schedule_deletion_needs_the_typed_name(administrator, world):
    response = administrator.post(url("keyvault_keyencryptionkey_schedule_deletion", world.alpha.pk),
                                  {"waiting_days": "7", "confirm_name": "Alpha"})

    assert response.status_code == 200
    assert "does not match this key's name; type alpha exactly" in " ".join(
        response.context["form"].errors["confirm_name"])
    assert KEK.objects.get(pk=world.alpha.pk).state == KEK.State.ENABLED
    assert len(events("kek.deletion_scheduled")) == 1  # the world's charlie only


@pytest.mark.parametrize("days", ["6", "31", "x"])
def test_schedule_deletion_waits_seven_to_thirty_days(administrator, world, days):
    response = administrator.post(url("keyvault_keyencryptionkey_schedule_deletion", world.alpha.pk),
                                  {"waiting_days": days, "confirm_name": "alpha"})

    assert response.status_code == 200 and response.context["form"].errors["waiting_days"]
    assert KEK.objects.get(pk=world.alpha.pk).state == KEK.State.ENABLED


def test_schedule_deletion_then_cancel(administrator, world):
    started = timezone.now()
    response = administrator.post(url("keyvault_keyencryptionkey_schedule_deletion", world.alpha.pk),
                                  {"waiting_days": "7", "confirm_name": "alpha"})

    assert response.status_code == 302
    kek = KEK.objects.get(pk=world.alpha.pk)
    assert kek.state == KEK.State.PENDING_DELETION
    assert started + timedelta(days=7) <= kek.deletion_date <= timezone.now() + timedelta(days=7)
    scheduled = events("kek.deletion_scheduled")[-1]
    assert (scheduled.target_id, scheduled.details["waiting_days"], scheduled.details["data_keys"]) == ("alpha", 7, 2)

    administrator.post(url("keyvault_keyencryptionkey_cancel_deletion", world.alpha.pk))

    kek.refresh_from_db()
    assert (kek.state, kek.deletion_date) == (KEK.State.DISABLED, None)
    assert events("kek.deletion_cancelled")[-1].actor == "user:administrator"


def test_schedule_deletion_page_shows_what_breaks(administrator, world):
    response = administrator.get(url("keyvault_keyencryptionkey_schedule_deletion", world.alpha.pk))

    assert response.status_code == 200
    found = response.context["impact"]
    assert [(v.number, v.data_keys) for v in found.versions] == [(1, 0), (2, 2)]
    page = response.content.decode()
    summary = re.search(r'id="kv-impact-summary">(.*?)</p>', page, flags=re.S).group(1)
    assert "2 data keys" in re.sub(r"<[^>]+>", "", summary)
    assert 'id="kv-impact-runs"' in page and "No active run." in page
    assert "leaves the key <strong>disabled</strong>" in page


def test_home_page_panel_lists_keys_pending_deletion_with_days_left_and_cancel(administrator, world):
    page = administrator.get(reverse("admin:index")).content.decode()

    panel = re.search(r'id="kv-panel-pending-deletion".*?</div>', page, flags=re.S).group(0)
    assert "1 key pending deletion" in panel and 'data-kek="charlie"' in panel
    assert re.search(r'class="kv-days-left">30 days<', panel)
    assert url("keyvault_keyencryptionkey_cancel_deletion", world.charlie.pk) in panel
    assert "<strong>disabled</strong>" in panel


def test_auditors_see_pending_deletions_but_no_cancel_link(auditor, world):
    page = auditor.get(reverse("admin:index")).content.decode()

    panel = re.search(r'id="kv-panel-pending-deletion".*?</div>', page, flags=re.S).group(0)
    assert "charlie" in panel and "kv-cancel-deletion" not in panel


def test_home_page_says_no_data_keys_instead_of_full_coverage(auditor, world):
    page = auditor.get(reverse("admin:index")).content.decode()

    chart = re.search(r'id="kv-chart-coverage".*?</svg>', page, flags=re.S).group(0)
    assert "<title>bravo: no data keys</title>" in chart and "bravo: 100%" not in chart
    assert "<title>alpha: 100%</title>" in chart  # alpha: both data keys on its primary v2
    assert re.search(r'id="kv-coverage-empty">No data keys: bravo \(', page)


# -- retiring versions -------------------------------------------------------------


def test_retiring_a_version_that_still_wraps_data_keys_shows_the_service_error(administrator, world):
    services.rotate_kek_version(world.alpha, actor=Actor.system("tests"))  # v2 is no longer primary

    response = administrator.post(url("keyvault_keyencryptionkey_retire_version", world.alpha.pk, 2),
                                  {"state": "disabled"})

    assert response.status_code == 200
    assert "v2 of 'alpha' still wraps 2 data key(s); rewrap them first" in " ".join(
        response.context["form"].non_field_errors())
    assert KeyVersion.objects.get(kek=world.alpha, number=2).state == KeyVersion.State.ENABLED
    assert not events("version.state_changed")


def test_retiring_the_primary_version_is_refused(administrator, world):
    response = administrator.post(url("keyvault_keyencryptionkey_retire_version", world.alpha.pk, 2),
                                  {"state": "disabled"})

    assert response.status_code == 200
    assert "primary version" in " ".join(response.context["form"].non_field_errors())


def test_disable_then_destroy_an_empty_version(administrator, world):
    retire = url("keyvault_keyencryptionkey_retire_version", world.alpha.pk, 1)

    assert administrator.post(retire, {"state": "disabled", "reason": "superseded"}).status_code == 302
    assert KeyVersion.objects.get(kek=world.alpha, number=1).state == KeyVersion.State.DISABLED

    mismatch = administrator.post(retire, {"state": "destroyed", "confirm_name": "wrong"})
    assert mismatch.status_code == 200 and mismatch.context["form"].errors["confirm_name"]

    assert administrator.post(retire, {"state": "destroyed", "confirm_name": "alpha"}).status_code == 302
    assert KeyVersion.objects.get(kek=world.alpha, number=1).state == KeyVersion.State.DESTROYED
    changes = [(e.details["from"], e.details["to"], e.details["enforced_by"]) for e in events("version.state_changed")]
    assert changes == [("enabled", "disabled", "provider"), ("disabled", "destroyed", "provider")]
    assert administrator.get(retire).status_code == 200  # the page still renders for a destroyed version
    assert administrator.get(url("keyvault_keyencryptionkey_retire_version", world.alpha.pk, 9)).status_code == 404


# -- CSRF --------------------------------------------------------------------------

ACTION_POSTS = [
    ("keyvault_keyencryptionkey_add", None, {"name": "csrf-key", "provider": "local", "rotation_period_days": "7"}),
    ("keyvault_keyencryptionkey_rotate", "alpha", {"reason": ""}),
    ("keyvault_keyencryptionkey_disable", "alpha", {"reason": ""}),
    ("keyvault_keyencryptionkey_enable", "bravo", {}),
    ("keyvault_keyencryptionkey_schedule_deletion", "alpha", {"waiting_days": "30", "confirm_name": "alpha"}),
    ("keyvault_keyencryptionkey_cancel_deletion", "charlie", {}),
    ("keyvault_keyencryptionkey_retire_version", "alpha", {"state": "disabled"}),
    ("keyvault_keyencryptionkey_change", "alpha", settings_post(description="csrf")),
    ("keyvault_auditevent_verify", None, {}),
]


def action_url(world, name, kek_name):
    if kek_name is None:
        return url(name)
    kek = getattr(world, kek_name)
    return url(name, kek.pk, 1) if name.endswith("retire_version") else url(name, kek.pk)


@pytest.mark.parametrize(("name", "kek_name", "data"), ACTION_POSTS, ids=[row[0] for row in ACTION_POSTS])
def test_actions_need_the_csrf_token(world, name, kek_name, data):
    client = client_as("administrator", csrf=True)
    target = action_url(world, name, kek_name)
    before = AuditEvent.objects.count()

    refused = client.post(target, data)

    assert refused.status_code == 403
    assert AuditEvent.objects.count() == before
    assert client.get(target).status_code == 200  # the form page sets the token
    accepted = client.post(target, {**data, "csrfmiddlewaretoken": client.cookies["csrftoken"].value})
    assert accepted.status_code == 302
    assert AuditEvent.objects.count() > before


# -- key material ------------------------------------------------------------------


def encodings(secret: bytes) -> set[str]:
    return {
        secret.hex(), secret.hex().upper(),
        base64.b64encode(secret).decode(), base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
    }


def test_no_page_shows_key_material(world):
    # given data keys whose plaintexts we kept, and the local provider's master key
    secrets = set()
    for plaintext in world.plaintexts:
        secrets |= encodings(plaintext)
    master = django_settings.LOCAL_KMS_MASTER_KEY
    secrets |= {master} | encodings(base64.b64decode(master))
    for data_key in DataKey.objects.all():
        secrets |= encodings(bytes(data_key.wrapped_key))
    assert all(len(s) >= 32 for s in secrets)
    client = client_as("administrator")
    event = AuditEvent.objects.order_by("-sequence").first()
    pages = [
        url("index"), url("app_list", "keyvault"),
        url("keyvault_keyencryptionkey_changelist"), url("keyvault_keyencryptionkey_change", world.alpha.pk),
        url("keyvault_keyencryptionkey_history", world.alpha.pk), url("keyvault_keyencryptionkey_add"),
        url("keyvault_datakey_changelist"), url("keyvault_datakey_change", world.data_key.pk),
        url("keyvault_auditevent_changelist"), url("keyvault_auditevent_change", event.pk),
        url("keyvault_auditevent_verify"), url("keyvault_auditcheckpoint_changelist"),
    ] + [action_url(world, name, kek) for name, kek, _ in ACTION_POSTS]

    # when every page is rendered, then none holds any encoding of any secret
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, page
        html = page_text(response)
        leaked = [s for s in secrets if s in html]
        assert not leaked, f"{page} shows key material"
    # and neither do the pages after actions that fail in the provider layer
    failed = client.post(url("keyvault_keyencryptionkey_rotate", world.charlie.pk), {"reason": ""})
    assert not [s for s in secrets if s in page_text(failed)]


# -- audit chain banner ------------------------------------------------------------


def tamper(sql: str, params=()) -> None:
    """Change an audit row behind the application's back, as the tables' owner could (tests/audit_owner.py)."""
    with as_table_owner() as cursor:
        cursor.execute(sql, params)


def expire_banner() -> None:
    """As if the minute the recorded status is shown for had passed."""
    AuditVerification.objects.update(checked_at=None)


def banner(client) -> str:
    html = page_text(client.get(url("keyvault_auditevent_changelist")))
    match = re.search(r'<div class="kv-chain[^"]*"[^>]*>(.*?)</div>', html, re.S)
    assert match, "no chain banner"
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", match.group(1))).strip()


def test_banner_says_how_far_the_chain_is_verified(auditor, world):
    last = AuditEvent.objects.order_by("-sequence").first().sequence

    text = banner(auditor)

    assert text.startswith(f"Audit chain verified to #{last} at ")
    assert "Verify now" in page_text(auditor.get(url("keyvault_auditevent_changelist")))


def test_banner_is_cached_then_extends_verification_incrementally(auditor, world, django_assert_max_num_queries):
    first = AuditEvent.objects.order_by("-sequence").first().sequence
    banner(auditor)
    services.rotate_kek_version(world.alpha, actor=Actor.system("tests"))

    # within the minute the cached status is shown
    assert f"verified to #{first} " in banner(auditor)

    # after it expires only the new events are read
    expire_banner()
    assert f"verified to #{first + 1} " in banner(auditor)
    assert AuditVerification.objects.get(pk=1).anchor_sequence == first + 1


def test_banner_verifies_at_most_a_budget_per_page_view(auditor, world, monkeypatch):
    monkeypatch.setattr(audit_status, "INCREMENTAL_BUDGET", 3)
    last = AuditEvent.objects.order_by("-sequence").first().sequence

    assert "verified to #3 " in banner(auditor)
    assert f"{last - 3} newer events not verified yet" in banner(auditor)
    expire_banner()
    assert "verified to #6 " in banner(auditor)


def test_banner_shows_where_a_new_event_was_edited(auditor, world):
    banner(auditor)
    services.rotate_kek_version(world.alpha, actor=Actor.system("tests"))
    edited = AuditEvent.objects.order_by("-sequence").first().sequence
    tamper("UPDATE keyvault_auditevent SET actor = %s WHERE sequence = %s", ["user:mallory", edited])
    expire_banner()

    text = banner(auditor)

    assert text.startswith(f"Audit chain BROKEN at #{edited}: content does not match its hash (event edited)")


def test_an_edit_before_the_verified_anchor_takes_verify_now(auditor, world):
    # given a verified chain, and then an old event edited behind the console's back
    banner(auditor)
    tamper("UPDATE keyvault_auditevent SET actor = %s WHERE sequence = 2", ["user:mallory"])
    expire_banner()
    assert "verified to" in banner(auditor)  # page views check only new events (documented)

    # when an auditor runs the full verification
    response = auditor.post(url("keyvault_auditevent_verify"))

    # then the banner shows the break, even after the status expires, in every process (nothing is
    # kept in this one's memory), and the verification is audited
    assert response.status_code == 302
    assert banner(auditor).startswith("Audit chain BROKEN at #2: content does not match its hash")
    expire_banner()
    cache.clear()
    assert banner(auditor).startswith("Audit chain BROKEN at #2")
    verified = events("audit.verified")[-1]
    assert (verified.outcome, verified.details["broken_at"], verified.actor) == ("failure", 2, "user:auditor")


def test_verify_now_confirms_an_intact_chain(auditor, world):
    response = auditor.post(url("keyvault_auditevent_verify"), follow=True)

    assert "Full verification: OK: audit chain intact" in " ".join(messages_of(response))
    verified = events("audit.verified")[-1]
    assert verified.outcome == "success" and verified.details["ok"] is True
    assert "Last full verification" in banner(auditor)


def test_verify_now_twice_within_the_limit_answers_with_a_message_not_a_500(auditor, world, settings):
    # given "Verify now" limited to once a minute (issue 12, finding 12) and one verification just run
    settings.AUDIT_VERIFY_NOW_SECONDS = 60
    cache.clear()
    auditor.post(url("keyvault_auditevent_verify"))

    # when the auditor presses it again
    response = auditor.post(url("keyvault_auditevent_verify"), follow=True)

    # then it is refused with the wait, and no second full walk is recorded
    assert response.status_code == 200
    assert any("Full verification not started: a full verification ran less than 60 s ago" in text
               for text in messages_of(response))
    assert len(events("audit.verified")) == 1
    cache.clear()


def test_banner_catches_removed_newest_events(auditor, world):
    banner(auditor)
    last = AuditEvent.objects.order_by("-sequence").first().sequence
    tamper("DELETE FROM keyvault_auditevent WHERE sequence = %s", [last])
    expire_banner()

    assert banner(auditor).startswith(f"Audit chain BROKEN at #{last}: event changed or removed since it was verified")


# -- big tables --------------------------------------------------------------------


def test_paginator_caps_the_count_of_a_filtered_table(world):
    class Small(EstimatedCountPaginator):
        exact_up_to = 1

    capped = Small(DataKey.objects.filter(kek=world.alpha).order_by("-id"), 100)
    exact = Small(DataKey.objects.filter(kek=world.bravo).order_by("-id"), 100)

    assert (capped.count, capped.count_text) == (1, "more than 1")
    assert (exact.count, exact.count_text) == (0, "0")


def test_paginator_estimates_an_unfiltered_table(world):
    class Small(EstimatedCountPaginator):
        exact_up_to = 1

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("ANALYZE keyvault_datakey")
    paginator = Small(DataKey.objects.order_by("-id"), 100)

    if connection.vendor == "postgresql":
        # the planner's figure, not a count; reltuples after ANALYZE is exact for a tiny table
        assert (paginator.count, paginator.count_text) == (2, "about 2")
    else:
        assert (paginator.count, paginator.count_text) == (1, "more than 1")


@pytest.mark.parametrize(("changelist", "params", "noun"), [
    ("keyvault_auditevent_changelist", {"actor": "system:tests"}, "audit events"),
    ("keyvault_datakey_changelist", {"owner_ref__isnull": "False"}, "data keys"),
])
def test_big_changelists_never_count_the_whole_table(auditor, world, monkeypatch, changelist, params, noun):
    monkeypatch.setattr(EstimatedCountPaginator, "exact_up_to", 1)

    with CaptureQueriesContext(connection) as queries:
        response = auditor.get(url(changelist), params)

    assert response.status_code == 200
    assert f"more than 1 {noun}" in page_text(response)
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts and all("LIMIT" in sql.upper() for sql in counts), counts


# -- audit log: search, outcome, date range, keyset pages (issue 16) ---------------------------


@pytest.fixture
def trouble(world):
    """Given a denial (by mallory, in request r-0042) and a failed login among the world's successes."""
    from keyvault.audit import events as audit_events

    mallory = Actor(name="user:mallory", request_id="r-0042")
    denied = audit_events.access_denied(actor=mallory, method="POST", path="/keyvault/keyencryptionkey/1/rotate/")
    failed = audit_events.password_login_failed("root", actor=Actor(name="user:root"), known_user=False)
    return denied, failed


def audit_sequences(client, **params) -> list[int]:
    response = client.get(url("keyvault_auditevent_changelist"), params)
    assert response.status_code == 200
    return [event.sequence for event in response.context["cl"].result_list]


def test_audit_search_matches_actor_target_or_request_id_exactly(auditor, world, trouble):
    denied, failed = trouble
    # an actor by its short name or in full
    assert audit_sequences(auditor, q="mallory") == [denied.sequence]
    assert audit_sequences(auditor, q="user:mallory") == [denied.sequence]
    # a target id (the KEK's events) and a request id
    bravo = audit_sequences(auditor, q="bravo")
    assert bravo and all(AuditEvent.objects.get(sequence=s).target_id == "bravo" for s in bravo)
    assert audit_sequences(auditor, q="r-0042") == [denied.sequence]
    # exact, not a substring
    assert audit_sequences(auditor, q="mall") == []


def test_audit_outcome_filter_and_failures_marked_red(auditor, world, trouble):
    denied, failed = trouble

    assert audit_sequences(auditor, outcome="denied") == [denied.sequence]
    assert audit_sequences(auditor, outcome="failure") == [failed.sequence]
    assert audit_sequences(auditor, outcome="problems") == [failed.sequence, denied.sequence]
    successes = audit_sequences(auditor, outcome="success")
    assert successes and not {denied.sequence, failed.sequence} & set(successes)

    html = page_text(auditor.get(url("keyvault_auditevent_changelist")))
    assert html.count("kv-outcome-problem") == 2  # exactly the two bad events carry the red marker
    assert re.search(r'class="kv-outcome kv-outcome-denied kv-outcome-problem">&#9888; Denied<', html)
    assert "keyvault/reports.css" in html  # the stylesheet that paints them red


def test_audit_date_range_takes_any_range_and_explains_a_bad_date(auditor, world):
    now = timezone.now()
    everything = AuditEvent.objects.count()
    assert len(audit_sequences(auditor, **{"from": (now - timedelta(days=400)).date().isoformat()})) == everything
    assert len(audit_sequences(auditor, to=(now - timedelta(days=1)).date().isoformat())) == 0
    later = (now + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert audit_sequences(auditor, **{"from": later}) == []
    assert len(audit_sequences(auditor, to=later)) == everything

    response = auditor.get(url("keyvault_auditevent_changelist"), {"from": "2026-13-45"})
    assert response.status_code == 200 and list(response.context["cl"].result_list) == []
    assert any("from: not a date" in m for m in messages_of(response))
    backwards = auditor.get(url("keyvault_auditevent_changelist"), {"from": "2026-02-01", "to": "2026-01-01"})
    assert any("from must be before to" in m for m in messages_of(backwards))


def test_audit_list_pages_by_key_without_offset(auditor, world, settings):
    # given more events than fit a page
    for number in range(7):
        services.rotate_kek_version(world.alpha, actor=Actor(name=f"user:pager{number}"))
    all_sequences = list(AuditEvent.objects.order_by("-sequence").values_list("sequence", flat=True))
    from keyvault.console.admin import AuditEventAdmin

    page_size = 5
    original, AuditEventAdmin.list_per_page = AuditEventAdmin.list_per_page, page_size
    try:
        # when the pages are walked through their "older" links
        seen, params, queries = [], {}, []
        while True:
            with CaptureQueriesContext(connection) as captured:
                response = auditor.get(url("keyvault_auditevent_changelist"), params)
            queries += [q["sql"] for q in captured.captured_queries]
            cl = response.context["cl"]
            seen += [event.sequence for event in cl.result_list]
            if not cl.older_query:
                break
            params = {"before": cl.older_query.split("before=")[1].split("&")[0]}
        # then every event appears once, newest first, and no query skipped rows with OFFSET
        assert seen == all_sequences
        assert not any("OFFSET" in sql.upper() for sql in queries if "keyvault_auditevent" in sql)
        # and "newer" from the second page leads back to the first
        second = auditor.get(url("keyvault_auditevent_changelist"), {"before": all_sequences[page_size - 1]})
        newer = second.context["cl"].newer_query
        back = auditor.get(url("keyvault_auditevent_changelist") + newer)
        assert [e.sequence for e in back.context["cl"].result_list] == all_sequences[:page_size]
        # a filter link drops the cursor: it starts again at the newest match
        assert "before=" not in second.context["cl"].get_query_string({"outcome": "success"})
    finally:
        AuditEventAdmin.list_per_page = original


def test_a_time_range_is_listed_newest_first_and_paged_by_time(auditor, world):
    from keyvault.console.admin import AuditEventAdmin

    for number in range(6):
        services.rotate_kek_version(world.alpha, actor=Actor(name=f"user:ranger{number}"))
    today = timezone.now().date()
    expected = list(AuditEvent.objects.order_by("-timestamp", "-sequence").values_list("sequence", flat=True))
    original, AuditEventAdmin.list_per_page = AuditEventAdmin.list_per_page, 4
    try:
        seen, params = [], {"from": str(today), "to": str(today)}
        while True:
            cl = auditor.get(url("keyvault_auditevent_changelist"), params).context["cl"]
            seen += [event.sequence for event in cl.result_list]
            if not cl.older_query:
                break
            params = {"from": str(today), "to": str(today), "before": cl.older_query.split("before=")[1].split("&")[0]}
        assert seen == expected
    finally:
        AuditEventAdmin.list_per_page = original
