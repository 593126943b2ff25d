"""The rate limit in the console: the run page shows it, administrators change it live (audited)."""

from __future__ import annotations

import pytest

from keyvault.models import AuditEvent
from rotation import services
from rotation.models import ProviderRateLimit
from tests.rotation.conftest import seed_data_keys
from tests.rotation.test_admin import _fresh_cache, clients, start_from_console, url, users  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db


def test_the_run_page_and_its_progress_show_the_cap_and_the_rate_allowed_now(clients, kek, settings):  # noqa: F811
    settings.ROTATION_RATE_LIMITS = {"local": 5000}
    seed_data_keys(kek, 5)
    run = start_from_console(clients["operator"], kek)

    page = clients["auditor"].get(url("rotation_rotationrun_change", run.pk)).content.decode()
    progress = clients["auditor"].get(url("rotation_rotationrun_progress", run.pk)).json()

    assert "local: cap 5,000 calls/s (HMD_ROTATION_RATE_LIMITS default); allowed now 5,000 calls/s" in page
    assert progress["rate_limits"][0] | {"text": None} == {
        "provider": "local", "cap": 5000, "cap_source": "HMD_ROTATION_RATE_LIMITS default", "allowed": 5000.0,
        "factor": 1.0, "paused_for": 0.0, "throttles": 0, "measured": None, "text": None}


def test_an_administrator_changes_a_cap_in_the_console_and_it_is_audited(clients):  # noqa: F811
    response = clients["administrator"].post(url("rotation_providerratelimit_add"), {"provider": "local", "cap": "300"})

    assert response.status_code == 302, response.content[:800]
    assert ProviderRateLimit.objects.get(provider="local").cap == 300
    assert services.rate_limit_status("local").allowed == 300
    event = AuditEvent.objects.get(action="rotation.policy_changed", target_id="local")
    assert event.actor == "user:adam" and event.details["rate_limit"]["cap"] == [None, 300]


def test_operators_see_rate_limits_but_do_not_change_them(clients):  # noqa: F811
    assert clients["operator"].get(url("rotation_providerratelimit_changelist")).status_code == 200
    response = clients["operator"].post(url("rotation_providerratelimit_add"), {"provider": "local", "cap": "1"})
    assert response.status_code == 403
    assert not ProviderRateLimit.objects.exists()
