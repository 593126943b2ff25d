"""Provider health: the service, ``kms health`` and the console's Providers page.

Given KEKs in the inventory and providers in every condition (working, KEK lost or
disabled at the provider, unreachable, not configured), when health is checked,
then each provider and each enabled KEK gets a result that says what is wrong.
The unreachable provider is the real Vault Transit provider pointed at a port
nothing listens on; the "lost" and "disabled" keys are real states of the real
local provider.
"""

from __future__ import annotations

import copy
import socket

import pytest
from django.core.cache import cache
from django.core.management import CommandError, call_command
from django.urls import reverse
from prometheus_client import REGISTRY

from keyvault.keys import health, services
from keyvault.kms import KeyState, get_provider
from keyvault.models import KeyEncryptionKey
from tests.keyvault import make_role_user, use_temp_keyring

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _isolated(settings, tmp_path):
    use_temp_keyring(settings, tmp_path)
    cache.clear()


@pytest.fixture
def closed_port():
    """A port bound but never listening: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def unreachable_vault(settings, closed_port):
    """A ``vault`` provider entry whose server is down, plus a KEK the inventory places there."""
    kms = copy.deepcopy(settings.KMS)
    kms["providers"]["vault"] = {"addr": f"http://127.0.0.1:{closed_port}", "token": "s.unused", "timeout": 1}
    settings.KMS = kms
    return KeyEncryptionKey.objects.create(name="vaulted", provider="vault", provider_key_id="vaulted")


def test_a_working_provider_and_its_keks_are_healthy(system_actor):
    # given two enabled KEKs at the local provider
    services.create_kek(name="payments", actor=system_actor)
    services.create_kek(name="profiles", actor=system_actor)

    # when the local provider is checked
    result = health.check_provider("local")

    # then it is reachable, every KEK passed, and the capabilities are listed
    assert result.healthy and result.reachable and result.is_default
    assert [check.kek for check in result.keks] == ["payments", "profiles"]
    assert all(check.ok for check in result.keks)
    assert result.keks[0].detail == "enabled, primary v1 of 1 version(s)"
    assert "set_primary" in result.capabilities
    assert result.latency_ms >= 0


def test_a_kek_lost_at_the_provider_fails_its_check(system_actor):
    # given a KEK the inventory calls enabled, naming a key the provider does not have
    kek = services.create_kek(name="payments", actor=system_actor)
    KeyEncryptionKey.objects.filter(pk=kek.pk).update(provider_key_id="never-created")

    # when health is checked
    report = health.check_all()

    # then the provider still answers, but the KEK check (and so the provider) fails, naming the error
    local = report.provider("local")
    assert local.reachable and not local.healthy and not report.healthy
    (check,) = local.failed_keks
    assert check.kek == "payments"
    assert check.detail.startswith("KeyNotFound")


def test_a_kek_disabled_at_the_provider_fails_its_check(system_actor):
    # given a KEK enabled in the inventory but disabled behind Keyvault's back
    kek = services.create_kek(name="payments", actor=system_actor)
    get_provider("local").set_key_state(kek.provider_key_id, KeyState.DISABLED)

    # when it is checked
    (check,) = health.check_provider("local").keks

    # then the mismatch is reported
    assert not check.ok
    assert check.detail == "the inventory says enabled, the provider says disabled"


def test_disabled_keks_are_not_checked(system_actor):
    # given a KEK disabled in the inventory (and at the provider)
    kek = services.create_kek(name="old", actor=system_actor)
    services.disable_kek(kek, actor=system_actor, reason="retired")

    # when the provider is checked, then only enabled KEKs are looked up
    assert health.check_provider("local").keks == ()


def test_an_unreachable_provider_is_unhealthy_and_its_keks_are_not_looked_up(unreachable_vault):
    # when every provider is checked while the vault server is down
    report = health.check_all()

    # then vault is unreachable with the connection error as detail, and its KEK is marked not checked
    vault = report.provider("vault")
    assert not vault.reachable and not report.healthy
    assert vault.detail
    assert [(check.kek, check.ok, check.detail) for check in vault.keks] == [
        ("vaulted", False, "not checked: provider unreachable")
    ]
    assert report.provider("local").healthy
    assert REGISTRY.get_sample_value("keyvault_kms_provider_healthy", {"provider": "vault"}) == 0
    assert REGISTRY.get_sample_value("keyvault_kms_provider_healthy", {"provider": "local"}) == 1


def test_a_kek_naming_an_unconfigured_provider_is_reported():
    # given a KEK whose provider is no longer configured
    KeyEncryptionKey.objects.create(name="orphan", provider="gone", provider_key_id="orphan")

    # when every provider is checked
    report = health.check_all()

    # then the missing provider has a row saying why, and its KEK is listed as failed
    gone = report.provider("gone")
    assert not gone.healthy
    assert gone.detail.startswith("ConfigurationError")
    assert [check.kek for check in gone.failed_keks] == ["orphan"]


# -- the command -------------------------------------------------------------------


def test_health_all_prints_providers_and_kek_checks(system_actor, capsys):
    # given a working provider with one KEK
    services.create_kek(name="payments", actor=system_actor)

    # when every provider is checked from the command line
    call_command("kms", "health", "--all")

    # then the provider line keeps its format and the KEK check follows it
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("local: healthy (")
    assert any(line.startswith("  capabilities: ") for line in out)
    assert "  KEK payments (payments): ok — enabled, primary v1 of 1 version(s)" in out


def test_health_all_fails_when_anything_is_unhealthy(system_actor, unreachable_vault, capsys):
    # given a working local KEK and a vault provider that is down
    services.create_kek(name="payments", actor=system_actor)

    # when every provider is checked, then the command fails naming the unhealthy provider
    with pytest.raises(CommandError, match="unhealthy: vault"):
        call_command("kms", "health", "--all")
    out = capsys.readouterr().out
    assert "vault: UNHEALTHY" in out
    assert "KEK vaulted (vaulted): FAILED — not checked: provider unreachable" in out


def test_health_of_one_provider_fails_on_a_destroyed_kek(system_actor, capsys):
    # given a KEK destroyed at the provider behind Keyvault's back
    kek = services.create_kek(name="payments", actor=system_actor)
    get_provider("local").destroy_key(kek.provider_key_id)

    # when the default provider is checked, then the command fails and says why
    with pytest.raises(CommandError, match="unhealthy: local"):
        call_command("kms", "health")
    assert "the provider says destroyed" in capsys.readouterr().out


# -- the console page ----------------------------------------------------------------


def test_auditor_sees_each_provider_with_its_kek_checks(client, system_actor, unreachable_vault):
    # given a working local KEK, a vault provider that is down, and an auditor
    services.create_kek(name="payments", actor=system_actor)
    client.force_login(make_role_user("auditor"))

    # when the auditor opens the Providers page
    response = client.get(reverse("keyvault_providers"))

    # then both providers are shown with their health, capabilities and KEK checks
    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="provider-local"' in page and 'id="provider-vault"' in page
    assert "problems found" in page
    assert "unreachable" in page
    assert "set_primary" in page
    assert "payments" in page and "vaulted" in page
    assert "not checked: provider unreachable" in page


def test_the_index_links_to_the_providers_page(client):
    client.force_login(make_role_user("auditor"))

    page = client.get(reverse("admin:index")).content.decode()

    assert f'href="{reverse("keyvault_providers")}"' in page
    assert "KMS providers" in page


def test_a_staff_user_without_kek_view_permission_gets_403(client, django_user_model):
    user = django_user_model.objects.create_user("intern", is_staff=True)
    client.force_login(user)

    assert client.get(reverse("keyvault_providers")).status_code == 403
    assert "KMS providers" not in client.get(reverse("admin:index")).content.decode()
