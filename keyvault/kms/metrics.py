"""Prometheus metrics for KMS providers: calls, errors by class, latency.

The registry wraps every provider it builds in :class:`InstrumentedProvider`, a
thin proxy that times each method of the :class:`~keyvault.kms.base.KMSProvider`
contract, so no backend module carries metrics code. Calls a provider makes to
itself (the default ``rewrap`` decrypts and encrypts) are not counted twice: the
proxy only sees what callers ask for.

The proxy keeps the provider's envelope fast paths (:mod:`keyvault.kms.fastpath`):
it offers them metered as ``decrypt`` and ``generate_data_key``, so an envelope
over the registry's provider runs as fast as over the bare one, and every call
is still counted.

Series (label ``provider`` is the registry name, ``operation`` the method name):

* ``keyvault_kms_operations_total`` — calls, successful or not;
* ``keyvault_kms_errors_total`` — failed calls, by ``error`` (the exception class;
  ``Unhealthy`` for a health check that reported a failure);
* ``keyvault_kms_operation_duration_seconds`` — latency histogram;
* ``keyvault_kms_provider_healthy`` — 1/0 from the last health check.

Why not prometheus_client's ``Counter`` and ``Histogram`` for the first three:
they take a lock per value (the call counter, the bucket, the sum) and cost about
1.2 µs per call, a third of a whole local envelope decryption. An
:class:`OperationMeter` queues a call's duration with one atomic append and sorts
the queue into buckets now and then (about 0.2 µs per call in all); one
collector turns the meters into the same series at scrape time. Everything goes
to prometheus_client's default registry (``prometheus_client.REGISTRY``).
Nothing here imports Django.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from functools import wraps
from itertools import islice

from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .base import KMSProvider
from .fastpath import FastPaths, provider_fast_paths

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
_LE_LABELS = tuple(floatToGoString(bound) for bound in LATENCY_BUCKETS) + ("+Inf",)

HEALTHY = Gauge(
    "keyvault_kms_provider_healthy",
    "1 if the provider's last health check passed (reachable, authenticated, KEKs present), else 0.",
    ["provider"],
)

_perf_counter = time.perf_counter


#: Observations wait in a queue and are sorted into buckets at least this often (and at every scrape).
FOLD_SECONDS = 0.05


class OperationMeter:
    """Calls, latency and errors of one (provider, operation).

    A call's duration is appended to ``pending`` (one atomic C call, no lock);
    :meth:`fold` moves what is pending into ``buckets`` under the lock, at the
    latest :data:`FOLD_SECONDS` after the previous fold and at every scrape, so
    a scrape sees every call that has returned. ``buckets[i]`` counts calls
    that took at most ``LATENCY_BUCKETS[i]`` seconds and more than the bound
    before (the last one: longer than every bound); the call count is their sum.
    """

    __slots__ = ("provider", "operation", "lock", "pending", "fold_due", "buckets", "seconds", "errors")

    def __init__(self, provider: str, operation: str) -> None:
        self.provider = provider
        self.operation = operation
        self.lock = threading.Lock()
        self.pending: deque[float] = deque()
        self.fold_due = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0
        self.errors: dict[str, int] = {}

    def observe(self, started: float) -> None:
        """Count one call that began at ``started`` (``perf_counter``) and has just returned."""
        self.pending.append(_perf_counter() - started)
        if started >= self.fold_due:
            self.fold()

    def fold(self) -> None:
        """Sort the pending durations into the buckets.

        The per-item work runs in C (drain, sort, sum, one bisection per bound): the fold is
        a per-call cost too, and a Python loop over the items cost as much as the append.
        """
        pending, buckets = self.pending, self.buckets
        with self.lock:
            self.fold_due = _perf_counter() + FOLD_SECONDS
            # Only folds take items out, and only under the lock: len(pending) items are there.
            drained = list(islice(iter(pending.popleft, None), len(pending)))
            if not drained:
                return
            drained.sort()
            # buckets[i] gets the durations d with LATENCY_BUCKETS[i-1] < d <= LATENCY_BUCKETS[i].
            below = 0
            for index, bound in enumerate(LATENCY_BUCKETS):
                upto = bisect_right(drained, bound, below)
                buckets[index] += upto - below
                below = upto
            buckets[-1] += len(drained) - below
            self.seconds += sum(drained)

    def count_error(self, error: str) -> None:
        with self.lock:
            self.errors[error] = self.errors.get(error, 0) + 1

    def snapshot(self) -> tuple[list[int], float, dict[str, int]]:
        self.fold()
        with self.lock:
            return list(self.buckets), self.seconds, dict(self.errors)


_meters_lock = threading.Lock()
_meters: dict[tuple[str, str], OperationMeter] = {}


def _after_fork_in_child() -> None:
    # A lock some other thread of the parent held at the fork would never be released here.
    global _meters_lock
    _meters_lock = threading.Lock()
    for each in _meters.values():
        each.lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def meter(provider: str, operation: str) -> OperationMeter:
    """The meter of ``operation`` on ``provider`` (one per pair and process, kept for the process's life)."""
    with _meters_lock:
        found = _meters.get((provider, operation))
        if found is None:
            found = _meters[(provider, operation)] = OperationMeter(provider, operation)
        return found


class _MeterCollector:
    """Turns every :class:`OperationMeter` into the three series at scrape time."""

    def describe(self):
        return [
            CounterMetricFamily("keyvault_kms_operations", "KMS provider calls, successful or not.",
                                labels=["provider", "operation"]),
            CounterMetricFamily("keyvault_kms_errors", "KMS provider calls that raised, by exception class.",
                                labels=["provider", "operation", "error"]),
            HistogramMetricFamily("keyvault_kms_operation_duration_seconds", "Time spent in KMS provider calls.",
                                  labels=["provider", "operation"]),
        ]

    def collect(self):
        calls, errors, latency = self.describe()
        with _meters_lock:
            meters = list(_meters.values())
        for each in meters:
            buckets, seconds, raised = each.snapshot()
            labels = [each.provider, each.operation]
            cumulative, running = [], 0
            for le, count in zip(_LE_LABELS, buckets):
                running += count
                cumulative.append((le, running))
            calls.add_metric(labels, running)
            latency.add_metric(labels, cumulative, seconds)
            for error, count in sorted(raised.items()):
                errors.add_metric([*labels, error], count)
        yield from (calls, errors, latency)


REGISTRY.register(_MeterCollector())


def record_health(provider: str, healthy: bool) -> None:
    """Set the health gauge of ``provider`` (called by whoever runs health checks)."""
    HEALTHY.labels(provider=provider).set(1 if healthy else 0)


def _timed(label: str, operation: str, method: Callable) -> Callable:
    meters = meter(label, operation)
    observe, count_error = meters.observe, meters.count_error

    @wraps(method)
    def call(*args, **kwargs):
        started = _perf_counter()
        try:
            result = method(*args, **kwargs)
        except Exception as exc:
            count_error(type(exc).__name__)
            raise
        finally:
            observe(started)
        if operation == "health_check" and not getattr(result, "healthy", True):
            # Health checks report instead of raising; a failed one still counts as an error.
            count_error("Unhealthy")
        return result

    return call


def _timed_parts(meters: OperationMeter, parts: Callable) -> Callable:
    """A fast path (``parts(first, encryption_context)``, as the envelope calls it) counted on ``meters``.

    :meth:`OperationMeter.observe`, inlined: this runs once per envelope operation without a cache.
    """
    record, count_error = meters.pending.append, meters.count_error

    def call(first, encryption_context=None):
        started = _perf_counter()
        try:
            return parts(first, encryption_context)
        except Exception as exc:
            count_error(type(exc).__name__)
            raise
        finally:
            record(_perf_counter() - started)
            if started >= meters.fold_due:
                meters.fold()

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
    def title(self) -> str:  # type: ignore[override]
        return self.wrapped.title

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

    def envelope_fast_paths(self) -> FastPaths:
        """The wrapped provider's fast paths, each call counted and timed as ``decrypt`` / ``generate_data_key``."""
        decrypt_parts, generate_parts = provider_fast_paths(self.wrapped)
        label = self.metrics_label
        return (
            _timed_parts(meter(label, "decrypt"), decrypt_parts) if decrypt_parts is not None else None,
            _timed_parts(meter(label, "generate_data_key"), generate_parts) if generate_parts is not None else None,
        )

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
