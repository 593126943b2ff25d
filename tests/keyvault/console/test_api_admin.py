"""The console's API client pages: created, re-tokened and revoked through the API services, tokens shown once."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from keyvault.api import services
from keyvault.exceptions import ApiAuthenticationFailed
from keyvault.models import ApiClient, AuditEvent
from tests.keyvault import build_world, make_role_user, use_temp_keyring

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_session(client, settings, tmp_path):
    use_temp_keyring(settings, tmp_path)
    build_world()
    client.force_login(make_role_user("administrator"))
    return client


def token_on(page) -> str:
    match = re.search(r'<pre class="kv-json" id="kv-api-token">([^<]+)</pre>', page.content.decode())
    assert match, "the token is shown on the page"
    return match.group(1)


def test_create_rotate_revoke_through_the_console(admin_session):
    created = admin_session.post(reverse("admin:keyvault_apiclient_add"), {
        "name": "billing", "owner": "payments", "keks": ["alpha"], "operations": ["unwrap", "generate"],
        "context_require": "service=billing\ntenant", "networks": "10.0.0.0/8", "rate_limit_per_second": "50"})
    assert created.status_code == 200
    first = token_on(created)
    client = ApiClient.objects.get(name="billing")
    assert client.context_constraints == {"service": ["billing"], "tenant": []}
    assert client.allowed_networks == ["10.0.0.0/8"] and client.rate_limit_per_second == 50
    assert services.authenticate(f"Bearer {first}") == client

    rotated = admin_session.post(reverse("admin:keyvault_apiclient_rotate_token", args=[client.pk]),
                                 {"overlap_hours": "2"})
    second = token_on(rotated)
    assert second != first and "keeps working until" in rotated.content.decode()
    assert services.authenticate(f"Bearer {first}") == services.authenticate(f"Bearer {second}") == client

    page = admin_session.get(reverse("admin:keyvault_apiclient_change", args=[client.pk]))
    assert first not in page.content.decode() and second not in page.content.decode()

    revoked = admin_session.post(reverse("admin:keyvault_apiclient_revoke", args=[client.pk]), {"reason": "test"})
    assert revoked.status_code == 302
    with pytest.raises(ApiAuthenticationFailed):
        services.authenticate(f"Bearer {second}")
    actions = AuditEvent.objects.filter(target_type="apiclient").order_by("sequence").values_list("action", "actor")
    assert list(actions) == [("api.client_created", "user:administrator"),
                             ("api.client_changed", "user:administrator"),
                             ("api.client_changed", "user:administrator")]


def test_a_bad_network_is_a_form_error_and_creates_nothing(admin_session):
    page = admin_session.post(reverse("admin:keyvault_apiclient_add"), {
        "name": "billing", "keks": ["alpha"], "operations": ["unwrap"], "networks": "10.0.0.0/99",
        "rate_limit_per_second": "1"})
    assert page.status_code == 200 and "errornote" in page.content.decode()
    assert not ApiClient.objects.exists()
