"""The 2FA pages say what RequireOTPMiddleware actually enforces on this installation."""

import re

import pytest
from django.urls import reverse

from tests.keyvault import make_role_user

pytestmark = pytest.mark.django_db


def enforcement_text(client) -> str:
    page = client.get(reverse("otp-enrol"), {"next": "/"}).content.decode()
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", re.search(r'id="kv-otp-enforcement">(.*?)</p>', page, flags=re.S).group(1)))


def test_enrol_page_in_development_mode_says_two_factor_is_not_enforced(client, settings):
    settings.DEBUG, settings.REQUIRE_2FA = True, False
    client.force_login(make_role_user("operator"))

    text = enforcement_text(client)

    assert "not enforced here" in text and "development mode" in text and "HMD_DEBUG=false" in text
    assert client.get(reverse("admin:index")).status_code == 200  # and indeed a password alone opens the console
    page = client.get(reverse("otp-enrol")).content.decode()
    assert "Your account needs a second factor" not in page


def test_enrol_page_says_two_factor_is_enforced_when_it_is(client, settings):
    settings.DEBUG, settings.REQUIRE_2FA = False, True
    client.force_login(make_role_user("operator"))

    text = enforcement_text(client)

    assert "is enforced here" in text and "not enforced" not in text
    assert client.get(reverse("admin:index"))["Location"].startswith(reverse("otp-enrol"))


def test_two_factor_turned_off_outside_development_is_said_plainly(client, settings):
    settings.DEBUG, settings.REQUIRE_2FA = False, False
    client.force_login(make_role_user("operator"))

    text = enforcement_text(client)

    assert "HMD_REQUIRE_2FA was turned off" in text and "even though this is not development mode" in text
