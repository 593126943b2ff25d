"""Test settings: Keyvault's own, plus a small app whose models use encrypted fields."""

from keyvault.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "tests.fieldapp"]  # noqa: F405
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests only
