"""Helpers shared by the console tests (tests/keyvault and tests/browser)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from keyvault.access.roles import AUDITORS, KEY_ADMINISTRATORS, KEY_OPERATORS

#: The console roles the tests log in as, mapped to their groups (None: not logged in).
ROLE_GROUPS: dict[str, str | None] = {
    "anonymous": None,
    "auditor": AUDITORS,
    "operator": KEY_OPERATORS,
    "administrator": KEY_ADMINISTRATORS,
}
ROLES = tuple(ROLE_GROUPS)


def use_temp_keyring(settings, directory) -> None:
    """Point the local KMS provider at a fresh keyring in ``directory`` (providers reset on change)."""
    kms = copy.deepcopy(settings.KMS)
    kms["providers"]["local"]["keyring_path"] = str(directory / "local-kms.keyring")
    settings.KMS = kms


def make_role_user(role: str, *, password: str | None = None):
    """A staff user (not a superuser) in the role's group, made by the accounts service (one audit event)."""
    from keyvault.access import accounts
    from keyvault.audit import Actor

    return accounts.create_user(username=role, actor=Actor.system("tests"), password=password, is_staff=True,
                                groups=[ROLE_GROUPS[role]])


@dataclass
class World:
    """Keys in every state an action needs.

    alpha: enabled, rotated once (v1 wraps no data key, v2 is primary and wraps two);
    bravo: disabled; charlie: pending deletion.
    """

    alpha: object
    bravo: object
    charlie: object
    data_key: object
    plaintexts: list[bytes]


def build_world() -> World:
    from keyvault.audit import Actor
    from keyvault.keys import services

    actor = Actor.system("tests")
    alpha = services.create_kek(name="alpha", actor=actor, description="payments database fields")
    services.rotate_kek_version(alpha, actor=actor, reason="setup")
    plaintexts = []
    data_key = None
    for owner in ("payments.card.number", "payments.card.cvc"):
        data_key, plain = services.create_data_key(
            alpha, actor=actor, encryption_context={"table": "card"}, purpose="card fields", owner_ref=owner
        )
        with plain:
            plaintexts.append(bytes(plain.plaintext))
    bravo = services.create_kek(name="bravo", actor=actor)
    services.disable_kek(bravo, actor=actor, reason="setup")
    charlie = services.create_kek(name="charlie", actor=actor)
    services.schedule_kek_deletion(charlie, actor=actor, waiting_days=30)
    for kek in (alpha, bravo, charlie):
        kek.refresh_from_db()
    return World(alpha=alpha, bravo=bravo, charlie=charlie, data_key=data_key, plaintexts=plaintexts)
