"""Destroying a compromised data key: only once a newer data key of its owner opens in its place."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from keyvault.exceptions import DataKeyNotSuperseded
from keyvault.keys import services
from keyvault.models import AuditEvent, DataKey
from tests.keyvault import make_role_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def kek(system_actor):
    return services.create_kek(name="exports", actor=system_actor)


def new_data_key(kek, actor, owner="billing.export"):
    row, plain = services.create_data_key(kek, actor=actor, owner_ref=owner, encryption_context={"tenant": "acme"})
    with plain:
        return row


def destroyed_events():
    return list(AuditEvent.objects.filter(action="datakey.destroyed").values_list("target_id", "details"))


def test_a_superseded_data_key_is_destroyed_and_audited(kek, system_actor):
    # given: an old data key and the newer one its owner re-encrypted under
    old, new = new_data_key(kek, system_actor), new_data_key(kek, system_actor)
    fingerprint = old.fingerprint

    # when
    services.destroy_data_key(old, replaced_by=new, actor=system_actor, reason="INC-1240 export DEK leaked")

    # then: the wrapped copy is gone, the replacement still opens, and the event says what and why
    assert not DataKey.objects.filter(pk=old.pk).exists()
    assert len(services.unwrap_data_key(new, actor=system_actor)) == 32
    assert destroyed_events() == [(str(old.pk), {
        "kek": "exports", "kek_version": 1, "owner_ref": "billing.export", "fingerprint": fingerprint,
        "replaced_by": new.pk, "reason": "INC-1240 export DEK leaked",
    })]


@pytest.mark.parametrize("case", ["itself", "older", "other owner", "no owner", "replacement does not open",
                                  "no reason"])
def test_destroying_is_refused_unless_a_newer_key_of_the_owner_opens(kek, system_actor, case):
    # given: an old data key and a candidate replacement that does not qualify
    old = new_data_key(kek, system_actor, owner="" if case == "no owner" else "billing.export")
    replacement = {
        "itself": lambda: old,
        "other owner": lambda: new_data_key(kek, system_actor, owner="billing.refund"),
    }.get(case, lambda: new_data_key(kek, system_actor, owner=old.owner_ref))()
    if case == "older":
        old, replacement = replacement, old
    if case == "replacement does not open":
        services.rotate_kek_version(kek, actor=system_actor)
        services.set_version_state(kek, 1, "disabled", actor=system_actor, force=True, reason="test")
    reason = "" if case == "no reason" else "INC-1240"

    # when / then: refused with a typed error, and nothing is deleted or audited as destroyed
    error = ValueError if case == "no reason" else DataKeyNotSuperseded
    with pytest.raises(error):
        services.destroy_data_key(old, replaced_by=replacement, actor=system_actor, reason=reason)
    assert DataKey.objects.filter(pk=old.pk).exists()
    assert destroyed_events() == []


def test_the_cli_destroys_and_refuses_like_the_service(kek, system_actor):
    old, new = new_data_key(kek, system_actor), new_data_key(kek, system_actor)

    with pytest.raises(CommandError, match="DataKeyNotSuperseded: .*older"):
        call_command("kms", "destroy-data-key", str(new.pk), "--replaced-by", str(old.pk), "--reason", "INC-1")
    out = io.StringIO()
    call_command("kms", "destroy-data-key", str(old.pk), "--replaced-by", str(new.pk), "--reason", "INC-1", stdout=out)

    assert f"destroyed data key #{old.pk} of billing.export; data key #{new.pk} replaces it" in out.getvalue()
    assert not DataKey.objects.filter(pk=old.pk).exists()


def test_the_console_page_shows_the_runbook_and_destroys_for_key_administrators_only(kek, system_actor):
    old, new = new_data_key(kek, system_actor), new_data_key(kek, system_actor)
    url = reverse("admin:keyvault_datakey_destroy", args=[old.pk])
    administrator, operator = Client(), Client()
    administrator.force_login(make_role_user("administrator"))
    operator.force_login(make_role_user("operator"))

    # the data key page links to it; the form has the runbook beside it
    page = administrator.get(reverse("admin:keyvault_datakey_change", args=[old.pk])).content.decode()
    assert url in page
    form = administrator.get(url).content.decode()
    assert "Runbook: Destroy a compromised data key" in form and "kms destroy-data-key" in form

    # an operator may not; a wrong confirmation is refused; then the administrator destroys it
    assert operator.post(url, {"replaced_by": new.pk, "reason": "INC-2", "confirm": old.pk}).status_code == 403
    wrong = administrator.post(url, {"replaced_by": new.pk, "reason": "INC-2", "confirm": new.pk})
    assert wrong.status_code == 200 and DataKey.objects.filter(pk=old.pk).exists()
    done = administrator.post(url, {"replaced_by": new.pk, "reason": "INC-2", "confirm": old.pk})
    assert done.status_code == 302 and not DataKey.objects.filter(pk=old.pk).exists()
    assert destroyed_events()[0][1]["replaced_by"] == new.pk
