"""Health of the KMS providers and of the KEKs they hold.

One service for every reader: the console's Providers page, ``manage.py kms
health`` and a future ``/healthz``. For each provider it asks the backend itself
(``health_check``: reachable, authenticated) and then, for every enabled KEK the
inventory places at that provider, whether the key exists there and may be used
(``describe_key``): enabled as a whole, and its primary version enabled. A KEK
the inventory calls enabled but the provider has lost or disabled is exactly the
fault that would otherwise surface only when the next data key fails to open.

Checks never raise: every failure becomes a row with the error class and message
(provider errors never carry key material). Each provider's result also sets the
``keyvault_kms_provider_healthy`` gauge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from django.utils import timezone

from keyvault.kms import KeyState, KMSError, VersionState, get_provider, provider_names
from keyvault.kms.metrics import record_health
from keyvault.models import KeyEncryptionKey

#: KEKs checked per provider on one report (one ``describe_key`` call each); the rest are counted, not checked.
MAX_KEK_CHECKS = 200


@dataclass(frozen=True)
class KEKCheck:
    """Whether one enabled KEK exists and is usable at its provider."""

    kek: str
    provider_key_id: str
    ok: bool
    detail: str
    latency_ms: float = 0.0


@dataclass(frozen=True)
class ProviderHealth:
    """One provider: its own health check, its capabilities and its KEKs' checks."""

    name: str
    reachable: bool
    latency_ms: float
    detail: str
    capabilities: tuple[str, ...] = ()
    is_default: bool = False
    keks: tuple[KEKCheck, ...] = ()
    unchecked_keks: int = 0

    @property
    def healthy(self) -> bool:
        """Reachable and every checked KEK is usable."""
        return self.reachable and all(check.ok for check in self.keks)

    @property
    def failed_keks(self) -> tuple[KEKCheck, ...]:
        return tuple(check for check in self.keks if not check.ok)


@dataclass(frozen=True)
class HealthReport:
    """Every provider's health at ``checked_at``."""

    providers: tuple[ProviderHealth, ...]
    checked_at: datetime = field(default_factory=timezone.now)

    @property
    def healthy(self) -> bool:
        return all(provider.healthy for provider in self.providers)

    def provider(self, name: str) -> ProviderHealth:
        """Return the result for provider ``name`` (``KeyError`` if it was not checked)."""
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)


def checked_provider_names() -> list[str]:
    """Configured providers, plus any provider an enabled KEK names (a missing one is a fault)."""
    names = set(provider_names())
    names.update(
        KeyEncryptionKey.objects.filter(state=KeyEncryptionKey.State.ENABLED).values_list("provider", flat=True)
    )
    return sorted(names)


def check_all(names: list[str] | None = None) -> HealthReport:
    """Check every provider in ``names`` (default: :func:`checked_provider_names`)."""
    names = checked_provider_names() if names is None else names
    return HealthReport(providers=tuple(check_provider(name) for name in names))


def check_provider(name: str | None = None) -> ProviderHealth:
    """Check provider ``name`` (default: the default provider) and its enabled KEKs. Never raises."""
    from keyvault.kms import registry

    name = name or registry.default_provider_name()
    is_default = name == registry.default_provider_name()
    keks = list(
        KeyEncryptionKey.objects.filter(provider=name, state=KeyEncryptionKey.State.ENABLED)
        .order_by("name")
        .values_list("name", "provider_key_id")
    )
    try:
        provider = get_provider(name)
    except KMSError as exc:  # unknown provider, missing SDK, bad options
        result = ProviderHealth(
            name=name, reachable=False, latency_ms=0.0, detail=_describe_error(exc), is_default=is_default,
            keks=_not_checked(keks, "provider is not configured"),
        )
        record_health(name, False)
        return result
    status = provider.health_check()
    capabilities = tuple(sorted(str(capability) for capability in provider.capabilities))
    checked, unchecked = keks[:MAX_KEK_CHECKS], max(0, len(keks) - MAX_KEK_CHECKS)
    if status.healthy:
        checks = tuple(_check_kek(provider, kek_name, key_id) for kek_name, key_id in checked)
    else:
        # Each describe_key would wait for the same timeout; say why they were not checked.
        checks = _not_checked(checked, "not checked: provider unreachable")
    result = ProviderHealth(
        name=name, reachable=status.healthy, latency_ms=status.latency_ms, detail=status.detail,
        capabilities=capabilities, is_default=is_default, keks=checks, unchecked_keks=unchecked,
    )
    record_health(name, result.healthy)
    return result


def _check_kek(provider, kek_name: str, key_id: str) -> KEKCheck:
    started = time.perf_counter()
    try:
        info = provider.describe_key(key_id)
        problem = _usability_problem(info)
    except KMSError as exc:
        problem = _describe_error(exc)
        info = None
    latency_ms = (time.perf_counter() - started) * 1000
    if problem:
        return KEKCheck(kek=kek_name, provider_key_id=key_id, ok=False, detail=problem, latency_ms=latency_ms)
    detail = f"enabled, primary v{info.primary_version} of {len(info.versions)} version(s)"
    return KEKCheck(kek=kek_name, provider_key_id=key_id, ok=True, detail=detail, latency_ms=latency_ms)


def _usability_problem(info) -> str:
    """Why a key the inventory calls enabled cannot be used at the provider ('' if it can)."""
    if info.state != KeyState.ENABLED:
        return f"the inventory says enabled, the provider says {info.state.value}"
    try:
        primary = info.version(info.primary_version)
    except KeyError:
        return f"the provider's primary version v{info.primary_version} is not among its versions"
    if primary.state != VersionState.ENABLED:
        return f"primary version v{primary.version} is {primary.state.value} at the provider"
    return ""


def _not_checked(keks, reason: str) -> tuple[KEKCheck, ...]:
    return tuple(KEKCheck(kek=name, provider_key_id=key_id, ok=False, detail=reason) for name, key_id in keks)


def _describe_error(exc: Exception) -> str:
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
