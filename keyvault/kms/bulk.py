"""Many ciphertexts at once: a bounded pool of in-flight requests, and migration between providers.

Remote KMSs answer one ciphertext per request (AWS ``ReEncrypt``, Cloud KMS
``Decrypt``/``Encrypt``), and a request spends almost all its time waiting for
the network, so a batch goes as fast as the number of requests kept in flight.
:func:`map_bounded` keeps at most ``concurrency`` of them in flight and returns
the outcomes aligned with the input, with the contract of
:meth:`keyvault.kms.base.KMSProvider.rewrap_many`: one item's :class:`KMSError`
is that item's outcome, and only :class:`ProviderUnavailable` (the backend is
down or throttling) ends the whole call, raised to the caller once the requests
already in flight have returned, with nothing new sent after it.

:func:`migrate_many` moves ciphertexts from one provider to another (decrypt at
the source, encrypt at the destination) the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .base import EncryptResult, KMSProvider, RewrapItem, RewrapOutcome
from .errors import ConfigurationError, KMSError, ProviderUnavailable

T = TypeVar("T")
R = TypeVar("R")

#: Requests a provider keeps in flight for one batch unless configured otherwise.
DEFAULT_CONCURRENCY = 16
#: More threads than this cost memory and context switches for no gain on any KMS we know.
MAX_CONCURRENCY = 256


def concurrency_option(name: str, value: object) -> int:
    """Validate a concurrency setting: a whole number from 1 to :data:`MAX_CONCURRENCY`.

    :raises ConfigurationError: naming the variable ``name``.
    """
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
        raise ConfigurationError(f"{name} must be a whole number from 1 to {MAX_CONCURRENCY}, not {value!r}")
    return value


def map_bounded(operation: Callable[[T], R], items: Sequence[T], *, concurrency: int) -> list[R | KMSError]:
    """``[operation(item) or its KMSError for item in items]``, at most ``concurrency`` at a time.

    :raises ProviderUnavailable: an item met it; items not started yet are not
        started, and the outcomes of the others are dropped (retry the batch).
    :raises Exception: anything that is not a :class:`KMSError` (a bug) ends the call too.
    """
    if not items:
        return []
    workers = max(1, min(concurrency, len(items)))
    if workers == 1:
        return [_outcome(operation, item) for item in items]
    results: list = [None] * len(items)
    pending = iter(range(len(items)))
    claim = threading.Lock()
    failures: list[BaseException] = []

    def drain() -> None:
        while not failures:
            with claim:
                index = next(pending, None)
            if index is None:
                return
            try:
                results[index] = _outcome(operation, items[index])
            except BaseException as exc:  # ProviderUnavailable or a bug: stop every worker, report in the caller
                failures.append(exc)
                return

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kms-bulk") as pool:
        for _ in range(workers):
            pool.submit(drain)
    if failures:
        raise _first_to_report(failures)
    return results


def _outcome(operation: Callable[[T], R], item: T) -> R | KMSError:
    try:
        return operation(item)
    except ProviderUnavailable:
        raise
    except KMSError as exc:
        return exc


def _first_to_report(failures: list[BaseException]) -> BaseException:
    """A bug beats an outage (it will not go away by retrying); among outages, the first one."""
    for failure in failures:
        if not isinstance(failure, ProviderUnavailable):
            return failure
    return failures[0]


def migrate_many(
    source: KMSProvider,
    destination: KMSProvider,
    items: Sequence[RewrapItem],
    *,
    destination_key_id: str,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[RewrapOutcome]:
    """Move ciphertexts of ``source`` under the primary version of ``destination_key_id`` at ``destination``.

    Each item is decrypted at the source and encrypted at the destination with
    the same encryption context, ``concurrency`` items in flight; its plaintext
    is overwritten as soon as it is sealed again and never reaches the caller.
    When source and destination are the same provider object, this is its own
    :meth:`~keyvault.kms.base.KMSProvider.rewrap_many` (server-side where the
    backend can). The result is aligned with ``items``, with the contract of
    ``rewrap_many``: an :class:`EncryptResult` (of the destination) or that
    item's :class:`KMSError` (``InvalidCiphertext`` from the source,
    ``KeyNotFound``/``KeyDisabled`` from the destination, ...).

    :raises ProviderUnavailable: either provider is down or throttling; retry the batch.
    :raises ConfigurationError: ``concurrency`` is not a number from 1 to 256.
    """
    concurrency = concurrency_option("concurrency", concurrency)
    if source is destination:
        return source.rewrap_many(items, key_id=destination_key_id)

    def move(item: RewrapItem) -> EncryptResult:
        opened = source.decrypt(item.ciphertext, encryption_context=item.encryption_context)
        plaintext = bytearray(opened.plaintext)
        try:
            return destination.encrypt(
                destination_key_id, bytes(plaintext), encryption_context=item.encryption_context
            )
        finally:
            plaintext[:] = bytes(len(plaintext))

    return map_bounded(move, items, concurrency=concurrency)


__all__ = ["DEFAULT_CONCURRENCY", "MAX_CONCURRENCY", "concurrency_option", "map_bounded", "migrate_many"]
