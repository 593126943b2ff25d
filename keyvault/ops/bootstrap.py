"""First-run setup for a fresh installation: an administrator, a default KEK and a few demo data keys.

``make run`` (``manage.py devserver``) calls :func:`bootstrap`; a newcomer's first rotation
should rewrap something, so the KEK it creates comes with :data:`DEMO_DATA_KEYS` registered
data keys (``--no-demo`` skips them). :func:`seed_demo_data_keys` (``manage.py kms seed-demo``)
registers more under any KEK. They are ordinary data keys, made by ``create_data_key`` and
audited as such, marked ``purpose="demo"``; their plaintext is wiped at once.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction

from keyvault.access import accounts
from keyvault.access.roles import KEY_ADMINISTRATORS
from keyvault.audit import Actor
from keyvault.keys import services
from keyvault.models import DataKey, KeyEncryptionKey
from rotation import services as rotation_services

DEFAULT_KEK = "default"
#: Data keys the bootstrap registers under the KEK it creates, so the first rotation has work to show.
DEMO_DATA_KEYS = 12
#: Most demo data keys one seed may register (each is a provider call and an audit event).
MAX_DEMO_DATA_KEYS = 10_000
DEMO_PURPOSE = "demo"


@dataclass(frozen=True)
class BootstrapResult:
    admin_created: bool
    admin_username: str
    generated_password: str | None
    kek_created: bool
    demo_data_keys: int = 0


def seed_demo_data_keys(kek: KeyEncryptionKey, *, count: int, actor: Actor | None = None) -> list[DataKey]:
    """Register ``count`` demo data keys under ``kek``'s primary version (``purpose="demo"``), plaintext wiped.

    :raises ValueError: ``count`` is not 1-:data:`MAX_DEMO_DATA_KEYS`.
    :raises KeyNotUsable: the KEK is disabled or pending deletion.
    """
    if not 1 <= count <= MAX_DEMO_DATA_KEYS:
        raise ValueError(f"demo data keys: give 1-{MAX_DEMO_DATA_KEYS}, not {count}")
    actor = actor or Actor.system("demo-seed")
    start = DataKey.objects.filter(kek=kek, purpose=DEMO_PURPOSE).count()
    rows = []
    for number in range(start, start + count):
        row, plain = services.create_data_key(kek, actor=actor, encryption_context={"demo": str(number)},
                                              purpose=DEMO_PURPOSE, owner_ref=f"demo.{kek.name}.{number}")
        with plain:
            rows.append(row)
    return rows


def bootstrap(*, admin_username: str = "admin", admin_password: str | None = None,
              demo_data_keys: int = DEMO_DATA_KEYS) -> BootstrapResult:
    """Create an administrator if there is no user, and a KEK named ``default`` if there is no KEK.

    The KEK it creates gets ``demo_data_keys`` registered demo data keys (0: none). A
    generated password is returned once, for the caller to show; it is never logged.
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
    kek_created, seeded = False, 0
    if not KeyEncryptionKey.objects.exists():
        kek = rotation_services.create_kek_with_policy(name=DEFAULT_KEK, actor=actor,
                                                       description="Created by make run for development.")
        kek_created = True
        seeded = len(seed_demo_data_keys(kek, count=demo_data_keys, actor=actor)) if demo_data_keys else 0
    return BootstrapResult(admin_created, admin_username, generated, kek_created, seeded)
