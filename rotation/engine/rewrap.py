"""Bulk rewrap for drivers that move data keys: id-range partitions, one task each, in short batches.

"What is left" is always the driver's query (:meth:`KekRotation.remaining`), never task
memory, so a killed worker's partition is simply picked up again and a batch run twice
changes nothing the second time. Partitions are rows with a lease (:mod:`.leases`): a
worker renews it before every batch, and a lease that runs out is taken over.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from keyvault.audit import events
from keyvault.keys import services as key_services
from keyvault.kms import BoundContext, EncryptResult, KMSError, RewrapItem, Throttled
from rotation.engine import leases, ratelimit, states
from rotation.engine.dispatch import dispatcher
from rotation.engine.states import ENGINE
from rotation.exceptions import RotationError
from rotation.models import RewrapPartition, RotationRun, RunStep

S = RotationRun.State

#: Id-range partitions per round when HMD_ROTATION_PARTITIONS is not set.
DEFAULT_PARTITIONS = 4
#: The failure recorded for a data key whose ciphertext turned out to belong to another key.
FOREIGN_CIPHERTEXT = "ForeignCiphertext"
#: Tries of one batch while the provider throttles (each waits out its pause) before the task retries later.
THROTTLED_ATTEMPTS = 5


def fan_out(run: RotationRun, driver) -> int:
    """Send what is left to workers as leased id-range partitions; returns how many were sent.

    While partitions of the run are open, only those nobody holds (not yet taken, or
    left by a dead worker) are sent again; a new round of ranges is cut only once every
    partition is done and keys remain (skipped while another worker held them).
    """
    now = timezone.now()
    open_partitions = list(leases.open_partitions(run.pk))
    if open_partitions:
        return sum(_send(partition, run) for partition in open_partitions
                   if not partition.owner or partition.lease_expires_at < now)
    bounds = driver.remaining(run).order_by().values_list("id", flat=True)
    low = bounds.order_by("id").first()
    if low is None:
        dispatcher("execute_run", run.pk)
        return 0
    high = bounds.order_by("-id").first() + 1
    count = max(1, min(getattr(settings, "ROTATION_PARTITIONS", DEFAULT_PARTITIONS), high - low))
    step = -(-(high - low) // count)
    partitions = leases.create(run, [(lo, min(lo + step, high)) for lo in range(low, high, step)], now=now)
    return sum(_send(partition, run) for partition in partitions)


def _send(partition: RewrapPartition, run: RotationRun) -> int:
    priority = 0 if run.kind == RotationRun.Kind.EMERGENCY else None
    dispatcher("rewrap_partition", run.pk, partition.pk, priority=priority)
    return 1


def rewrap_partition(run_id: int, partition_id: int, *, driver, owner: str | None = None,
                     batch_size: int | None = None) -> int:
    """Rewrap the remaining data keys of one partition under its lease, then any partition nobody holds.

    Returns how many rows were handled. A partition another worker holds is left alone
    (a duplicate message costs one query). Afterwards, if nothing is left anywhere, the
    run moves on to verification.
    """
    # Data keys rewrapped per transaction (HMD_ROTATION_BATCH_SIZE): one short transaction and one audit event each.
    batch_size = batch_size or settings.ROTATION_BATCH_SIZE
    owner = owner or leases.process_owner()
    partition = leases.claim(partition_id, owner)
    if partition is None:
        return 0
    done = 0
    while partition is not None:
        count, finished = _work(run_id, partition, owner, driver=driver, batch_size=batch_size)
        done += count
        if not finished:
            return done  # taken over, or the run left rewrapping
        partition = leases.claim_next(run_id, owner)  # an idle worker takes over what a dead one left
    finish_if_done(run_id, driver)
    return done


def _work(run_id: int, partition: RewrapPartition, owner: str, *, driver, batch_size: int) -> tuple[int, bool]:
    """Batches until the partition is done (True) or its lease or run is gone (False)."""
    done, after = 0, partition.cursor
    while True:
        if not leases.renew(partition, owner, cursor=after):
            return done, False
        run = RotationRun.objects.select_related("kek", "destination_kek").get(pk=run_id)
        if run.state != S.REWRAPPING:
            return done, False  # cancelled, rolled back or finished meanwhile
        count, after = rewrap_batch(run, driver=driver, after=after, hi=partition.hi, batch_size=batch_size)
        done += count
        if count == 0:
            leases.release(partition, owner)
            return done, True


def rewrap_batch(run: RotationRun, *, driver, after: int, hi: int, batch_size: int) -> tuple[int, int]:
    """Rewrap one batch in one transaction; returns (rows handled, last id seen).

    Rows another worker holds are skipped (``SKIP LOCKED``); rows that moved to the
    target already no longer match. A data key the provider cannot open is counted
    as failed and left on its old version (nothing is ever made unreadable). The
    provider calls go through the driver's bulk method, paced by the provider's rate
    limit (:mod:`rotation.engine.ratelimit`); when the provider throttles, what was
    rewrapped before is kept and the rest waits for the next batch.

    :raises Throttled: the provider kept refusing for its quota (the task retries later).
    :raises ProviderUnavailable: the provider is down (nothing of this batch is written).
    """
    source = key_services.provider_for(run.kek)
    destination_kek = driver.destination_kek(run)
    destination = key_services.provider_for(destination_kek)
    costs = driver.operation_costs(run, source, destination)
    deadline = time.time() + max_slot_wait()
    for _ in range(THROTTLED_ATTEMPTS):
        grant = ratelimit.reserve(costs, batch_size)
        if grant.ready_at(0) > deadline:  # a long pause asked by the provider: the task retries later instead
            ratelimit.release(grant, 0)
            delay = grant.ready_at(0) - time.time()
            raise Throttled(f"rotation paused for {delay:.0f} s at the provider's request", retry_after=delay)
        grant.wait_for(0)  # before the transaction: waiting for a slot holds no locks
        handled = 0
        try:
            handled, last, throttle = _rewrap_locked(run, driver, source, destination, destination_kek,
                                                     after=after, hi=hi, grant=grant)
            if throttle is not None:  # before the release: the rate that was refused is still counted
                ratelimit.throttled(costs, retry_after=throttle.retry_after)
        finally:
            ratelimit.release(grant, handled)
        if throttle is None or handled:
            return handled, last
    raise throttle


def max_slot_wait() -> float:
    """How long one batch may wait for its provider's slots in all: a third of a partition lease.

    The lease is renewed before each batch, so a batch that waited longer would lose its
    partition to another worker; a longer pause goes back to the task's retry instead.
    """
    return settings.ROTATION_LEASE_SECONDS / 3


def _rewrap_locked(run, driver, source, destination, destination_kek, *, after: int, hi: int, grant):
    """The transaction of :func:`rewrap_batch`: (rows handled, last id, the Throttled that cut it short or None)."""
    now = timezone.now()
    with transaction.atomic():
        rows = _locked_rows(driver.remaining(run).filter(id__gt=after, id__lt=hi).order_by("id")
                            .select_for_update(skip_locked=True)
                            .values_list("id", "wrapped_key", "encryption_context", "kek_id", "kek_version")
                            [:grant.rows])
        if not rows:
            return 0, hi, None
        items = [RewrapItem(wrapped, context) for _, wrapped, context, *_ in rows]
        outcomes, throttle = _rewrap_paced(run, driver, source, destination, items, grant)
        if not outcomes:
            return 0, after, throttle
        rows = rows[:len(outcomes)]
        updates, failures = [], []
        expected_key = destination_kek.provider_key_id
        for (pk, _, context, *_), outcome in zip(rows, outcomes):
            if isinstance(outcome, KMSError):
                failures.append((pk, type(outcome).__name__))
            elif outcome.key_id != expected_key:
                failures.append((pk, FOREIGN_CIPHERTEXT))  # the row held another key's ciphertext: left as it is
            else:
                updates.append((pk, outcome.ciphertext, outcome.key_version, context))
        moved = {}
        if updates:
            _verify_sample(destination, destination_kek, updates)
            # The long write first, holding only this batch's own rows. The rows every worker of
            # the run shares come after it, so the workers wait for each other only for the end of
            # a batch: taken first, they serialised two workers' whole batches (measured: two
            # workers no faster than one). The rows are locked: the KEK and version read with them
            # are still theirs, so the counters move from those without reading them again.
            moved = key_services.write_rewrapped_keys(updates, now, kek_id=destination_kek.pk,
                                                      moves=destination_kek.pk != run.kek_id,
                                                      previous={pk: (kek, version) for pk, _, _, kek, version in rows})
        # The run's row, then the versions' counters: a rollback locks them in the same order.
        RotationRun.objects.filter(pk=run.pk).update(
            rewrapped=F("rewrapped") + len(updates), failed_deks=F("failed_deks") + len(failures),
            heartbeat_at=now, paused_reason="",
        )
        key_services.count_data_key_moves(moved)
        events.batch_rewrapped(run.kek, actor=ENGINE, run_id=run.pk, first_id=rows[0][0], last_id=rows[-1][0],
                               rewrapped=len(updates), failed_ids=[pk for pk, _ in failures[:20]],
                               failed_errors=sorted({name for _, name in failures}),
                               **({"throttled": True} if throttle is not None else {}))
    return len(rows), rows[-1][0], throttle


def _locked_rows(queryset) -> list[tuple]:
    """The batch's (id, wrapped key, context, *the queryset's further columns) rows, read with its own SQL.

    A plain cursor, not the ORM's row conversion: that costs several times the read
    itself per row, and a batch reads thousands. Contexts repeat within a batch (a
    tenant's, a service's): each distinct one is parsed and bound (encoded) once, not
    parsed per row and encoded twice per row by the provider's decrypt and encrypt.
    """
    sql, params = queryset.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        fetched = cursor.fetchall()
    contexts: dict[str, Mapping] = {}
    rows = []
    for pk, wrapped, context, *rest in fetched:
        if isinstance(context, str):  # jsonb comes back as text, as Django asks of psycopg
            bound = contexts.get(context)
            if bound is None:
                bound = contexts[context] = _bound(json.loads(context))
            context = bound
        rows.append((pk, bytes(wrapped), context, *rest))
    return rows


def _bound(context):
    """``context`` bound once for the batch; one that cannot be bound is left as it was read, for the provider
    to meet exactly as it did before contexts were bound here."""
    try:
        return BoundContext(context)
    except (TypeError, ValueError):
        return context


def _rewrap_paced(run, driver, source, destination, items, grant) -> tuple[list, Throttled | None]:
    """The driver's bulk rewrap over ``items``, in chunks paced by the grant.

    Returns the outcomes (aligned with the first items) and, if the provider throttled,
    the error that stopped it: the items after the last outcome were not rewrapped.
    """
    outcomes: list = []
    step = grant.chunk_rows(len(items))
    for start in range(0, len(items), step):
        chunk = items[start:start + step]
        grant.wait_for(start)
        try:
            results = driver.rewrap_many(run, source, destination, chunk)
        except Throttled as exc:
            return outcomes, exc
        if len(results) != len(chunk) or not all(isinstance(r, (EncryptResult, KMSError)) for r in results):
            raise RotationError(f"{source.name}: rewrap_many returned {len(results)} results for {len(chunk)} items")
        outcomes.extend(results)
    return outcomes, None


def _verify_sample(provider, kek, updates) -> None:
    """Open one freshly rewrapped key through the provider before the batch commits."""
    pk, ciphertext, version, context = random.choice(updates)
    opened = provider.decrypt(ciphertext, encryption_context=context)
    if opened.key_version != version or opened.key_id != kek.provider_key_id:
        raise RotationError(f"verification of data key #{pk} failed: provider reports another key or version")


def finish_if_done(run_id: int, driver) -> str:
    """Nothing left: rewrapping → verifying. Only failed keys left: the run fails. Skipped keys left: another round.

    The driver's query decides, not the partitions: once nothing remains, partitions still
    open (a dead worker's, with nothing left in them) are closed rather than waited for.
    """
    with transaction.atomic():
        run = states.locked_run(run_id)
        if run.state != S.REWRAPPING:
            return run.state
        remaining = driver.remaining(run).count()
        if remaining == 0:
            leases.close_all(run.pk, now=timezone.now())
            states.tick(run, "rewrap", actor=ENGINE, evidence=f"{run.rewrapped} data keys rewrapped")
            driver.hooks.transition(run, S.VERIFYING, actor=ENGINE)
            dispatcher("execute_run", run.pk)
        elif run.failed_deks and remaining <= run.failed_deks:
            message = (f"{remaining} data key(s) could not be rewrapped (see the run's audit events); "
                       "the old version stays enabled")
            states.tick(run, "rewrap", actor=ENGINE, evidence=message, status=RunStep.Status.FAILED)
            driver.hooks.transition(run, S.FAILED, actor=ENGINE, note=message, last_error=message)
        elif not leases.open_partitions(run.pk).exists():
            # Every partition is done, yet keys remain (skipped while another worker held them,
            # or new ones of a migrated KEK): another round picks them up.
            fan_out(run, driver)
    return run.state
