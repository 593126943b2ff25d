"""Target drivers: what is rotated, behind one interface (:class:`.base.Driver`).

* :class:`.kek.KekRotation` — a new primary version of a KEK, data keys rewrapped to it;
* :class:`.kek.ProviderMigration` — data keys moved to another KEK (another provider);
* :class:`.secret.ManagedSecretRotation` — a managed secret, through its type's executor.
"""

from __future__ import annotations

from rotation.engine.drivers.base import Driver, Hooks
from rotation.engine.drivers.kek import KekRotation, ProviderMigration
from rotation.engine.drivers.secret import ManagedSecretRotation
from rotation.models import RotationRun

__all__ = ["Driver", "Hooks", "KekRotation", "ManagedSecretRotation", "ProviderMigration", "driver_class"]


def driver_class(*, secret: bool, kind: str) -> type[Driver]:
    """The driver for a run of ``kind`` on a managed secret (``secret``) or a KEK."""
    if secret:
        return ManagedSecretRotation
    return ProviderMigration if kind == RotationRun.Kind.MIGRATE else KekRotation
