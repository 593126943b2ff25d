"""Bulk rewrap for drivers that move data keys: id-range partitions, one task each, in short batches.

"What is left" is always the driver's query (:meth:`KekRotation.remaining`), never task
memory, so a killed worker's partition is simply picked up again and a batch run twice
changes nothing the second time. Partitions are rows with a lease (:mod:`.leases`): a
worker renews it before every batch, and a lease that runs out is taken over.
"""

from __future__ import annotations

import random

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from keyvault.audit import events
from keyvault.keys import services as key_services
from keyvault.kms import KMSError, ProviderUnavailable
from keyvault.models import DataKey
from rotation.engine import leases, states
from rotation.engine.dispatch import dispatcher
from rotation.engine.states import ENGINE
from rotation.exceptions import RotationError
from rotation.models import RewrapPartition, RotationRun, RunStep

S = RotationRun.State

#: Id-range partitions per round when HMD_ROTATION_PARTITIONS is not set.
DEFAULT_PARTITIONS = 4


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
    as failed and left on its old version (nothing is ever made unreadable).
    """
    source = key_services.provider_for(run.kek)
    destination_kek = driver.destination_kek(run)
    destination = key_services.provider_for(destination_kek)
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            driver.remaining(run).filter(id__gt=after, id__lt=hi).order_by("id")
            .select_for_update(skip_locked=True)
            .values_list("id", "wrapped_key", "encryption_context")[:batch_size]
        )
        if not rows:
            return 0, hi
        updates, failures = [], []
        for pk, wrapped, context in rows:
            try:
                result = driver.rewrap_one(run, source, destination, bytes(wrapped), context)
            except ProviderUnavailable:
                raise
            except KMSError as exc:
                failures.append((pk, type(exc).__name__))
                continue
            updates.append((pk, result.ciphertext, result.key_version, context))
        if updates:
            _verify_sample(destination, destination_kek, updates)
            _bulk_write(updates, now, kek_id=destination_kek.pk)
        RotationRun.objects.filter(pk=run.pk).update(
            rewrapped=F("rewrapped") + len(updates), failed_deks=F("failed_deks") + len(failures),
            heartbeat_at=now, paused_reason="",
        )
        events.batch_rewrapped(run.kek, actor=ENGINE, run_id=run.pk, first_id=rows[0][0], last_id=rows[-1][0],
                               rewrapped=len(updates), failed_ids=[pk for pk, _ in failures[:20]],
                               failed_errors=sorted({name for _, name in failures}))
    return len(rows), rows[-1][0]


def _verify_sample(provider, kek, updates) -> None:
    """Open one freshly rewrapped key through the provider before the batch commits."""
    pk, ciphertext, version, context = random.choice(updates)
    opened = provider.decrypt(ciphertext, encryption_context=context)
    if opened.key_version != version or opened.key_id != kek.provider_key_id:
        raise RotationError(f"verification of data key #{pk} failed: provider reports another key or version")


def _bulk_write(updates, now, *, kek_id: int) -> None:
    """One UPDATE for the batch (PostgreSQL: ``UPDATE … FROM (VALUES …)``), never a save() per row."""
    table = DataKey._meta.db_table
    if connection.vendor == "postgresql":
        values = ", ".join(["(%s::bigint, %s::bytea, %s::integer)"] * len(updates))
        params = [p for pk, blob, version, _ in updates for p in (pk, blob, version)]
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} AS d SET wrapped_key = v.w, kek_version = v.ver, kek_id = %s, last_rewrapped_at = %s "
                f"FROM (VALUES {values}) AS v(id, w, ver) WHERE d.id = v.id",
                [kek_id, now, *params],
            )
    else:
        with connection.cursor() as cursor:
            cursor.executemany(
                f"UPDATE {table} SET wrapped_key = %s, kek_version = %s, kek_id = %s, last_rewrapped_at = %s WHERE id = %s",
                [(blob, version, kek_id, now, pk) for pk, blob, version, _ in updates],
            )


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
