"""Prometheus metrics for KMS providers: calls, errors by class, latency.

The registry wraps every provider it builds in :class:`InstrumentedProvider`, a
thin proxy that times each method of the :class:`~keyvault.kms.base.KMSProvider`
contract, so no backend module carries metrics code. Calls a provider makes to
itself (the default ``rewrap`` decrypts and encrypts) are not counted twice: the
proxy only sees what callers ask for.

Series (label ``provider`` is the registry name, ``operation`` the method name):

* ``keyvault_kms_operations_total`` — calls, successful or not;
* ``keyvault_kms_errors_total`` — failed calls, by ``error`` (the exception class;
  ``Unhealthy`` for a health check that reported a failure);
* ``keyvault_kms_operation_duration_seconds`` — latency histogram;
* ``keyvault_kms_provider_healthy`` — 1/0 from the last health check.

Metrics go to prometheus_client's default registry (``prometheus_client.REGISTRY``).
Nothing here imports Django.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import wraps

from prometheus_client import Counter, Gauge, Histogram

from .base import KMSProvider

#: The contract's methods; each call is counted and timed.
INSTRUMENTED_OPERATIONS = (
    "create_key",
    "describe_key",
    "rotate_key",
    "set_key_version_state",
    "set_key_state",
    "set_primary_version",
    "destroy_key",
    "encrypt",
    "decrypt",
    "generate_data_key",
    "rewrap",
    "rewrap_many",
    "health_check",
)

#: From a fast local AES-GCM call (well under a millisecond) to a cloud call near its timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

OPERATIONS = Counter(
    "keyvault_kms_operations",
    "KMS provider calls, successful or not.",
    ["provider", "operation"],
)
ERRORS = Counter(
    "keyvault_kms_errors",
    "KMS provider calls that raised, by exception class.",
    ["provider", "operation", "error"],
)
LATENCY = Histogram(
    "keyvault_kms_operation_duration_seconds",
    "Time spent in KMS provider calls.",
    ["provider", "operation"],
    buckets=LATENCY_BUCKETS,
)
HEALTHY = Gauge(
    "keyvault_kms_provider_healthy",
    "1 if the provider's last health check passed (reachable, authenticated, KEKs present), else 0.",
    ["provider"],
)


def record_health(provider: str, healthy: bool) -> None:
    """Set the health gauge of ``provider`` (called by whoever runs health checks)."""
    HEALTHY.labels(provider=provider).set(1 if healthy else 0)


def _timed(label: str, operation: str, method: Callable) -> Callable:
    calls = OPERATIONS.labels(provider=label, operation=operation)
    latency = LATENCY.labels(provider=label, operation=operation)

    @wraps(method)
    def call(*args, **kwargs):
        calls.inc()
        started = time.perf_counter()
        try:
            result = method(*args, **kwargs)
        except Exception as exc:
            ERRORS.labels(provider=label, operation=operation, error=type(exc).__name__).inc()
            raise
        finally:
            latency.observe(time.perf_counter() - started)
        if operation == "health_check" and not getattr(result, "healthy", True):
            # Health checks report instead of raising; a failed one still counts as an error.
            ERRORS.labels(provider=label, operation=operation, error="Unhealthy").inc()
        return result

    return call


class InstrumentedProvider(KMSProvider):
    """A provider seen through a meter: same behaviour, every contract call counted and timed.

    Attributes the contract does not define (a backend's own helpers, test
    switches) are read from and written to the wrapped provider.

    :param provider: the real provider.
    :param label: the ``provider`` label; defaults to the provider's registry name
        (pass the configured name when one class serves several entries).
    """

    def __init__(self, provider: KMSProvider, *, label: str | None = None) -> None:
        object.__setattr__(self, "wrapped", provider)
        object.__setattr__(self, "metrics_label", label or provider.name or type(provider).__name__)
        for operation in INSTRUMENTED_OPERATIONS:
            object.__setattr__(self, operation, _timed(self.metrics_label, operation, getattr(provider, operation)))

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.wrapped.name

    @property
    def capabilities(self):  # type: ignore[override]
        return self.wrapped.capabilities

    def __getattr__(self, attribute: str):
        # Only reached for attributes the proxy does not have itself.
        return getattr(object.__getattribute__(self, "wrapped"), attribute)

    def __setattr__(self, attribute: str, value) -> None:
        setattr(self.wrapped, attribute, value)

    def __repr__(self) -> str:
        return f"InstrumentedProvider({self.wrapped!r})"

    # The abstract methods are replaced per instance in __init__; these satisfy the ABC.
    def create_key(self, key_id, *, description=""):  # pragma: no cover - shadowed
        return self.wrapped.create_key(key_id, description=description)

    def describe_key(self, key_id):  # pragma: no cover - shadowed
        return self.wrapped.describe_key(key_id)

    def rotate_key(self, key_id):  # pragma: no cover - shadowed
        return self.wrapped.rotate_key(key_id)

    def set_key_version_state(self, key_id, version, state):  # pragma: no cover - shadowed
        return self.wrapped.set_key_version_state(key_id, version, state)

    def encrypt(self, key_id, plaintext, *, encryption_context=None):  # pragma: no cover - shadowed
        return self.wrapped.encrypt(key_id, plaintext, encryption_context=encryption_context)

    def decrypt(self, ciphertext, *, encryption_context=None):  # pragma: no cover - shadowed
        return self.wrapped.decrypt(ciphertext, encryption_context=encryption_context)

    def generate_data_key(self, key_id, *, encryption_context=None, key_spec="AES_256"):  # pragma: no cover
        return self.wrapped.generate_data_key(key_id, encryption_context=encryption_context, key_spec=key_spec)

    def health_check(self):  # pragma: no cover - shadowed
        return self.wrapped.health_check()


def instrument(provider: KMSProvider, *, label: str | None = None) -> KMSProvider:
    """Return ``provider`` wrapped for metrics (an already wrapped one is returned as is)."""
    if isinstance(provider, InstrumentedProvider):
        return provider
    return InstrumentedProvider(provider, label=label)
