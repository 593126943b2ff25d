"""Test settings: Keyvault's own, plus a small app whose models use encrypted fields."""

from keyvault.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "tests.fieldapp"]  # noqa: F405
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests only
# Tests roll their database back but a witness file would remember their checkpoints; the
# witness tests (tests/keyvault/audit/test_witness.py) point AUDIT_WITNESS at their own files.
AUDIT_WITNESS = []
# "Verify now" is rate-limited through the cache, which outlives each test's rollback;
# tests/keyvault/audit/test_witness.py turns the limit on where it is tested.
AUDIT_VERIFY_NOW_SECONDS = 0
