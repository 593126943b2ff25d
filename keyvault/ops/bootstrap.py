"""First-run setup for a fresh installation: an administrator and a default KEK."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction

from keyvault.access import accounts
from keyvault.access.roles import KEY_ADMINISTRATORS
from keyvault.audit import Actor
from keyvault.models import KeyEncryptionKey
from rotation import services as rotation_services

DEFAULT_KEK = "default"


@dataclass(frozen=True)
class BootstrapResult:
    admin_created: bool
    admin_username: str
    generated_password: str | None
    kek_created: bool


def bootstrap(*, admin_username: str = "admin", admin_password: str | None = None) -> BootstrapResult:
    """Create an administrator if there is no user, and a KEK named ``default`` if there is no KEK.

    A generated password is returned once, for the caller to show; it is never logged.
    """
    actor = Actor.system("bootstrap")
    User = get_user_model()
    generated = None
    admin_created = False
    with transaction.atomic():
        if not User.objects.exists():
            generated = None if admin_password else secrets.token_urlsafe(16)
            accounts.create_user(username=admin_username, actor=actor, password=admin_password or generated,
                                 is_superuser=True, groups=[KEY_ADMINISTRATORS])
            admin_created = True
    kek_created = False
    if not KeyEncryptionKey.objects.exists():
        rotation_services.create_kek_with_policy(name=DEFAULT_KEK, actor=actor,
                                                 description="Created by make run for development.")
        kek_created = True
    return BootstrapResult(admin_created, admin_username, generated, kek_created)
