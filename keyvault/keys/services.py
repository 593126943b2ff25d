"""Key lifecycle services: the only code that changes keys.

The console, the ``kms`` command, the bootstrap and the rotation engine all call
these functions. Each runs in one transaction, locks the rows it changes and
writes its audit event in that same transaction, so an operation whose audit
event cannot be written does not happen.

Provider calls happen inside the transaction, after the row lock: if the audit
write then fails, the database change rolls back but the provider change (a
new key version, say) stays — harmless, because versions the inventory does not
know are never used, and the next rotation or ``refresh_kek`` reconciles them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.db.models import Count, F
from django.utils import timezone

from keyvault import audit
from keyvault.audit import Actor, events
from keyvault.exceptions import CoverageIncomplete, DataKeyNotSuperseded, InvalidStateTransition, KeyNotUsable
from keyvault.keys import envelopes
from keyvault.keys.fields import rewrap_field
from keyvault.kms import Capability, KeyState, KMSProvider, UnsupportedOperation, VersionState, get_provider
from keyvault.kms import DataKey as PlainDataKey
from keyvault.kms.context import normalise_context
from keyvault.models import DataKey, KeyEncryptionKey, KeyVersion, wrapped_key_fingerprint

KEK = KeyEncryptionKey
MIN_DELETION_WAIT_DAYS = 7
MAX_DELETION_WAIT_DAYS = 30
DEFAULT_DELETION_WAIT_DAYS = 30


def provider_for(kek: KeyEncryptionKey) -> KMSProvider:
    """The provider that holds ``kek``'s material."""
    return get_provider(kek.provider)


def _locked(kek: KeyEncryptionKey) -> KeyEncryptionKey:
    return KeyEncryptionKey.objects.select_for_update().get(pk=kek.pk)


def _transition(kek: KeyEncryptionKey, new_state: str) -> None:
    current = KEK.State(kek.state)
    if KEK.State(new_state) not in KEK.TRANSITIONS[current]:
        raise InvalidStateTransition(
            f"KEK {kek.name!r} is {current.label.lower()}; it cannot become {KEK.State(new_state).label.lower()}"
        )
    kek.state = new_state


def require_usable(kek: KeyEncryptionKey) -> None:
    """Refuse crypto with a KEK that is not enabled, saying why."""
    if kek.state == KEK.State.PENDING_DELETION:
        raise KeyNotUsable(
            f"KEK {kek.name!r} is pending deletion (destroyed on {kek.deletion_date:%Y-%m-%d %H:%M} UTC); "
            "cancel the deletion to use it"
        )
    if kek.state != KEK.State.ENABLED:
        raise KeyNotUsable(f"KEK {kek.name!r} is {KEK.State(kek.state).label.lower()}")


def _apply_provider_key_state(kek: KeyEncryptionKey, state: KeyState) -> None:
    """Mirror a key-level state to the provider where it supports one."""
    provider = provider_for(kek)
    if provider.supports(Capability.DISABLE_KEY):
        provider.set_key_state(kek.provider_key_id, state)


# -- KEK lifecycle ---------------------------------------------------------------


def create_kek(
    *,
    name: str,
    actor: Actor,
    provider_name: str | None = None,
    description: str = "",
    max_encryptions_per_version: int | None = None,
) -> KeyEncryptionKey:
    """Create a KEK at its provider and register it with version 1 as primary.

    Its rotation schedule is its rotation policy's: ``rotation.services.create_kek_with_policy``
    creates both in one transaction (the console, ``kms create-key`` and the bootstrap call it).
    """
    provider = get_provider(provider_name)
    with transaction.atomic():
        if KeyEncryptionKey.objects.filter(name=name).exists():
            raise InvalidStateTransition(f"a KEK named {name!r} already exists")
        info = provider.create_key(name, description=description)
        kek = KeyEncryptionKey.objects.create(
            name=name,
            provider=provider.name,
            provider_key_id=info.key_id,
            description=description,
            max_encryptions_per_version=max_encryptions_per_version,
        )
        KeyVersion.objects.create(kek=kek, number=info.primary_version, is_primary=True, provider_version_ref=str(info.primary_version))
        events.kek_created(kek, actor=actor, provider=provider.name, provider_key_id=info.key_id)
    return kek


def update_kek_settings(
    kek: KeyEncryptionKey,
    *,
    actor: Actor,
    description: str | None = None,
    max_encryptions_per_version: int | None = None,
) -> KeyEncryptionKey:
    """Change a KEK's description or usage limit (its schedule is its rotation policy's)."""
    with transaction.atomic():
        kek = _locked(kek)
        changes = {}
        if description is not None and description != kek.description:
            kek.description = description
            changes["description"] = description
        if max_encryptions_per_version != kek.max_encryptions_per_version:
            kek.max_encryptions_per_version = max_encryptions_per_version
            changes["max_encryptions_per_version"] = max_encryptions_per_version
        if changes:
            kek.save()
            events.kek_settings_changed(kek, actor=actor, **changes)
    return kek


def enable_kek(kek: KeyEncryptionKey, *, actor: Actor) -> KeyEncryptionKey:
    """Enable a disabled KEK."""
    with transaction.atomic():
        kek = _locked(kek)
        _transition(kek, KEK.State.ENABLED)
        _apply_provider_key_state(kek, KeyState.ENABLED)
        kek.save()
        events.kek_enabled(kek, actor=actor)
        transaction.on_commit(envelopes.forget)
    return kek


def disable_kek(kek: KeyEncryptionKey, *, actor: Actor, reason: str = "") -> KeyEncryptionKey:
    """Disable a KEK: it refuses every crypto operation until enabled."""
    with transaction.atomic():
        kek = _locked(kek)
        _transition(kek, KEK.State.DISABLED)
        _apply_provider_key_state(kek, KeyState.DISABLED)
        kek.save()
        events.kek_disabled(kek, actor=actor, reason=reason)
        transaction.on_commit(envelopes.forget)
    return kek


def schedule_kek_deletion(
    kek: KeyEncryptionKey, *, actor: Actor, waiting_days: int = DEFAULT_DELETION_WAIT_DAYS, now: datetime | None = None
) -> KeyEncryptionKey:
    """Schedule destruction after ``waiting_days`` (7-30, as AWS KMS); crypto stops at once."""
    if not MIN_DELETION_WAIT_DAYS <= waiting_days <= MAX_DELETION_WAIT_DAYS:
        raise ValueError(f"waiting period must be {MIN_DELETION_WAIT_DAYS}-{MAX_DELETION_WAIT_DAYS} days")
    with transaction.atomic():
        kek = _locked(kek)
        _transition(kek, KEK.State.PENDING_DELETION)
        kek.deletion_date = (now or timezone.now()) + timedelta(days=waiting_days)
        _apply_provider_key_state(kek, KeyState.DISABLED)
        kek.save()
        events.kek_deletion_scheduled(kek, actor=actor, waiting_days=waiting_days, deletion_date=kek.deletion_date,
                                      data_keys=kek.data_keys.count())
        transaction.on_commit(envelopes.forget)
    return kek


def cancel_kek_deletion(kek: KeyEncryptionKey, *, actor: Actor) -> KeyEncryptionKey:
    """Cancel a scheduled deletion; the KEK stays disabled until enabled (AWS semantics)."""
    with transaction.atomic():
        kek = _locked(kek)
        _transition(kek, KEK.State.DISABLED)
        kek.deletion_date = None
        kek.save()
        events.kek_deletion_cancelled(kek, actor=actor)
        transaction.on_commit(envelopes.forget)
    return kek


def destroy_due_keks(*, actor: Actor | None = None, now: datetime | None = None) -> list[str]:
    """Destroy every KEK whose deletion date has passed. Returns their names."""
    actor = actor or Actor.system("deletion-sweep")
    now = now or timezone.now()
    destroyed = []
    due = KeyEncryptionKey.objects.filter(state=KEK.State.PENDING_DELETION, deletion_date__lte=now)
    for kek in due:
        with transaction.atomic():
            kek = _locked(kek)
            if kek.state != KEK.State.PENDING_DELETION or kek.deletion_date > now:
                continue  # cancelled meanwhile
            provider = provider_for(kek)
            if provider.supports(Capability.DESTROY_KEY):
                provider.destroy_key(kek.provider_key_id)
                material = "destroyed at provider"
            else:
                material = "provider cannot destroy keys; disabled at provider, destroy there by hand"
            _transition(kek, KEK.State.DESTROYED)
            kek.save()
            kek.versions.update(state=KeyVersion.State.DESTROYED, is_primary=False)
            events.kek_destroyed(kek, actor=actor, material=material)
            transaction.on_commit(envelopes.forget)
            destroyed.append(kek.name)
    return destroyed


# -- versions --------------------------------------------------------------------


def rotate_kek_version(
    kek: KeyEncryptionKey, *, actor: Actor, reason: str = "", run_id: int | None = None,
) -> KeyVersion:
    """Make a new primary version at the provider; older versions keep decrypting.

    The next rotation is the rotation policy's to set (a run moves it when it rotates).
    """
    with transaction.atomic():
        kek = _locked(kek)
        require_usable(kek)
        provider = provider_for(kek)
        previous = kek.versions.filter(is_primary=True).first()
        new = provider.rotate_key(kek.provider_key_id)
        kek.versions.filter(is_primary=True).update(is_primary=False)
        version, _ = KeyVersion.objects.update_or_create(
            kek=kek,
            number=new.version,
            defaults={"is_primary": True, "state": KeyVersion.State.ENABLED, "provider_version_ref": str(new.version)},
        )
        kek.last_rotated_at = timezone.now()
        kek.save()
        events.kek_rotated(kek, actor=actor, new_version=new.version,
                           previous_version=previous.number if previous else None, reason=reason, run_id=run_id)
    return version


def restore_primary_version(
    kek: KeyEncryptionKey, number: int, *, actor: Actor, reason: str = "", run_id: int | None = None,
) -> KeyVersion:
    """Make an earlier, still enabled version primary again (a rotation rolled back before retirement).

    The newer version stays enabled, so data keys already rewrapped under it keep opening.
    Audited as a KEK change naming the primary before and after.

    :raises UnsupportedOperation: the provider always encrypts with its newest version.
    :raises InvalidStateTransition: the version is not enabled.
    """
    with transaction.atomic():
        kek = _locked(kek)
        version = KeyVersion.objects.select_for_update().get(kek=kek, number=number)
        if version.state != KeyVersion.State.ENABLED:
            raise InvalidStateTransition(f"v{number} of {kek.name!r} is {version.state}; only an enabled version can be primary")
        provider = provider_for(kek)
        if not provider.supports(Capability.SET_PRIMARY):
            raise UnsupportedOperation(f"provider {provider.name} always encrypts with its newest version")
        previous = kek.versions.filter(is_primary=True).first()
        provider.set_primary_version(kek.provider_key_id, number)
        kek.versions.filter(is_primary=True).update(is_primary=False)
        KeyVersion.objects.filter(pk=version.pk).update(is_primary=True)
        version.is_primary = True
        events.kek_primary_restored(kek, actor=actor, before=previous.number if previous else None, after=number,
                                    reason=reason, run_id=run_id)
    return version


def count_data_key_moves(moves: Mapping[tuple[int, int], int]) -> None:
    """Add each (KEK id, version) -> delta to ``KeyVersion.data_keys``, in one order (no deadlocks).

    The key services call it with their own writes; the rotation engine with what
    :func:`write_rewrapped_keys` returned, in the same transaction.
    """
    for (kek_id, number), delta in sorted(moves.items()):
        if delta:
            KeyVersion.objects.filter(kek_id=kek_id, number=number).update(data_keys=F("data_keys") + delta)


def recount_data_keys() -> int:
    """Set every version's ``data_keys`` to an exact count (after rows were loaded around the services).

    Returns how many versions were corrected. One grouped scan of the data keys: slow at
    millions, so it is a repair, never what a page runs.
    """
    with transaction.atomic():
        exact = {(kek_id, number): count for kek_id, number, count in
                 DataKey.objects.values_list("kek_id", "kek_version").annotate(n=Count("id")).order_by()
                 .values_list("kek_id", "kek_version", "n")}
        corrected = 0
        for version in KeyVersion.objects.select_for_update().order_by("pk"):
            count = exact.get((version.kek_id, version.number), 0)
            if version.data_keys != count:
                KeyVersion.objects.filter(pk=version.pk).update(data_keys=count)
                corrected += 1
    return corrected


#: Per-connection scratch table of :func:`write_rewrapped_keys` on PostgreSQL (emptied at every commit).
REWRAPPED_TABLE = "kv_rewrapped"


def store_rewrapped_batch(updates, now: datetime, *, kek_id: int, moves: bool = True) -> None:
    """Write a rotation batch's new wrapped keys and move the versions' data-key counters with them.

    :func:`write_rewrapped_keys` then :func:`count_data_key_moves`, in the caller's transaction.
    """
    count_data_key_moves(write_rewrapped_keys(updates, now, kek_id=kek_id, moves=moves))


def write_rewrapped_keys(updates, now: datetime, *, kek_id: int, moves: bool = True,
                         previous: Mapping[int, tuple[int, int]] | None = None) -> dict[tuple[int, int], int]:
    """Write a rotation batch's new wrapped keys (and their fingerprints) in one UPDATE, never a save() per row.

    ``updates`` holds (id, new wrapped key, KEK version, context) tuples; the caller (the
    rotation engine) has locked the rows, verified a sample and records the batch's audit
    event in the same transaction. PostgreSQL: binary ``COPY`` into a temporary table and
    one ``UPDATE … FROM`` it — no SQL text to build or parse per row. ``kek_id`` is
    written only when data keys move to another KEK (a migration). ``previous``: id ->
    (KEK id, version) of each row as the caller read it under its row locks; read here
    when not given.

    Returns the counter moves, (KEK id, version) -> delta, which the caller must apply with
    :func:`count_data_key_moves` before it commits. They are apart so that the engine takes
    the rows every worker shares (its run, then these counters) only after this long write:
    taken before it, they made the workers of one run wait for each other's whole batch.
    """
    if not updates:
        return {}
    if previous is None:
        previous = {pk: (kek, version) for pk, kek, version in DataKey.objects.filter(
            pk__in=[pk for pk, *_ in updates]).values_list("pk", "kek_id", "kek_version")}
    table = DataKey._meta.db_table
    kek_column = "kek_id = %s, " if moves else ""
    kek_param = [kek_id] if moves else []
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {REWRAPPED_TABLE} (id bigint, w bytea, ver integer, "
                           "fp varchar(16)) ON COMMIT DELETE ROWS")
            # Empty already after each commit; not when batches share an outer transaction (tests, drive()).
            cursor.execute(f"DELETE FROM {REWRAPPED_TABLE}")
            with cursor.cursor.copy(f"COPY {REWRAPPED_TABLE} (id, w, ver, fp) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "bytea", "int4", "varchar"])
                for pk, blob, version, _ in updates:
                    copy.write_row((pk, blob, version, wrapped_key_fingerprint(blob)))
            # The id range is there for the planner: the scratch table has no statistics, and without
            # it a batch that is a few per cent of the table can be planned as a hash join over the
            # whole table (measured: 300 ms a batch at 300 000 keys, against 60 ms with index lookups).
            low, high = min(pk for pk, *_ in updates), max(pk for pk, *_ in updates)
            cursor.execute(
                f"UPDATE {table} AS d SET wrapped_key = r.w, fingerprint = r.fp, kek_version = r.ver, "
                f"{kek_column}last_rewrapped_at = %s FROM {REWRAPPED_TABLE} AS r "
                "WHERE d.id = r.id AND d.id BETWEEN %s AND %s RETURNING d.id",
                [*kek_param, now, low, high],
            )
            written = {pk for (pk,) in cursor.fetchall()}
        else:
            cursor.executemany(
                f"UPDATE {table} SET wrapped_key = %s, fingerprint = %s, kek_version = %s, {kek_column}"
                "last_rewrapped_at = %s WHERE id = %s",
                [(blob, wrapped_key_fingerprint(blob), version, *kek_param, now, pk)
                 for pk, blob, version, _ in updates],
            )
            written = previous.keys()
    counts: dict[tuple[int, int], int] = {}
    for pk, _, new_version, _ in updates:
        if pk in written:  # a written row missing from ``previous`` is the caller's bug: KeyError, not a drifted counter
            old_kek, old_version = previous[pk]
            new_kek = kek_id if moves else old_kek
            counts[old_kek, old_version] = counts.get((old_kek, old_version), 0) - 1
            counts[new_kek, new_version] = counts.get((new_kek, new_version), 0) + 1
    return counts


def version_coverage(kek: KeyEncryptionKey) -> dict[int, int]:
    """How many data keys each version of ``kek`` wraps."""
    rows = DataKey.objects.filter(kek=kek).values("kek_version").annotate(n=Count("id")).order_by()
    return {row["kek_version"]: row["n"] for row in rows}


def coverage_by_kek(kek_ids=None) -> dict[int, dict[int, int]]:
    """How many data keys each version wraps, for many KEKs (all when ``kek_ids`` is None), from the counters.

    KEK id -> {version: data keys}; versions that wrap none are left out, as in
    :func:`version_coverage`. Reads ``KeyVersion.data_keys`` (kept by these services): a
    row per version, where counting would read every data key's index entry (~300 ms at 1M).
    """
    versions = KeyVersion.objects.filter(data_keys__gt=0)
    if kek_ids is not None:
        versions = versions.filter(kek_id__in=list(kek_ids))
    coverage: dict[int, dict[int, int]] = {}
    for kek_id, number, count in versions.values_list("kek_id", "number", "data_keys"):
        coverage.setdefault(kek_id, {})[number] = count
    return coverage


def set_version_state(
    kek: KeyEncryptionKey,
    number: int,
    state: str,
    *,
    actor: Actor,
    force: bool = False,
    reason: str = "",
) -> KeyVersion:
    """Enable, disable or destroy one version.

    The primary cannot be retired. A version that still wraps data keys cannot be
    retired either unless ``force`` (an emergency, with a reason): those keys would
    stop decrypting.

    :returns: the version, its ``enforced_by`` saying who now refuses or allows it: ``"provider"``,
        or ``"inventory"`` when the provider cannot change that version's state (then only
        Keyvault refuses it; :func:`revocation_gap` says what is left open).
    """
    state = KeyVersion.State(state)
    with transaction.atomic():
        kek = _locked(kek)
        version = KeyVersion.objects.select_for_update().get(kek=kek, number=number)
        if version.is_primary and state != KeyVersion.State.ENABLED:
            raise InvalidStateTransition(f"v{number} is the primary version of {kek.name!r}; rotate before retiring it")
        if version.state == KeyVersion.State.DESTROYED:
            raise InvalidStateTransition(f"v{number} of {kek.name!r} is destroyed and cannot change state")
        remaining = DataKey.objects.filter(kek=kek, kek_version=number).count()
        if state != KeyVersion.State.ENABLED and remaining and not force:
            raise CoverageIncomplete(
                f"v{number} of {kek.name!r} still wraps {remaining} data key(s); rewrap them first (rotation run)"
            )
        if force and not reason:
            raise ValueError("a forced retirement needs a reason")
        try:
            provider_for(kek).set_key_version_state(kek.provider_key_id, number, VersionState(state.value))
            enforced = "provider"
        except UnsupportedOperation:
            enforced = "inventory"  # the provider keeps the version usable; Keyvault refuses it
        previous_state = version.state
        version.state = state
        version.save(update_fields=["state"])
        version.enforced_by = enforced
        events.version_state_changed(kek, actor=actor, version=number, from_state=previous_state, to_state=state.value,
                                     enforced_by=enforced, data_keys_on_version=remaining, forced=force, reason=reason)
        transaction.on_commit(envelopes.forget)
    return version


def revocation_gap(kek: KeyEncryptionKey) -> str:
    """What disabling one of ``kek``'s versions leaves open at its provider ('' when the provider refuses it too).

    AWS KMS cannot disable one backing-key version: a version Keyvault retires is refused by
    Keyvault only, and the key still decrypts with that material for anyone its key policy and
    IAM allow. Revoking it there means moving every data key to another KMS key (a migrate run)
    and then disabling, or scheduling the deletion of, the old key. Shown wherever a version of
    such a key is disabled (console, ``kms set-version-state``, a rotation run's retirement).
    """
    provider = provider_for(kek)
    if provider.supports(Capability.DISABLE_VERSION):
        return ""
    title = provider.title or provider.name
    return (
        f"{title} cannot disable one key version: Keyvault refuses the old versions of {kek.name}, but "
        f"{title} still decrypts with their material for anyone allowed to use the key. To revoke them at "
        f"{title}, migrate the data keys to a new key (python manage.py kms create-key NEW --provider {kek.provider}; "
        f"python manage.py rotation start --kek {kek.name} --kind migrate --destination NEW --reason REASON), "
        f"then disable it (python manage.py kms disable-key {kek.name} --reason REASON) "
        f"or schedule its deletion (python manage.py kms schedule-key-deletion {kek.name})."
    )


def refresh_kek(kek: KeyEncryptionKey) -> KeyEncryptionKey:
    """Copy encryption counts (and versions made outside Keyvault) from the provider."""
    info = provider_for(kek).describe_key(kek.provider_key_id)
    with transaction.atomic():
        known = {v.number: v for v in KeyVersion.objects.select_for_update().filter(kek=kek)}
        for remote in info.versions:
            local = known.get(remote.version)
            if local is None:
                continue  # a version made at the provider directly: adopted only by a rotation
            if remote.encrypt_count is not None and remote.encrypt_count != local.encrypt_count:
                local.encrypt_count = remote.encrypt_count
                local.save(update_fields=["encrypt_count"])
    return kek


# -- data keys -------------------------------------------------------------------


def _primary_version(kek: KeyEncryptionKey) -> KeyVersion:
    return kek.versions.get(is_primary=True)


def create_data_key(
    kek: KeyEncryptionKey,
    *,
    actor: Actor,
    encryption_context: Mapping[str, str] | None = None,
    purpose: str = "",
    owner_ref: str = "",
    key_spec: str = "AES_256",
) -> tuple[DataKey, PlainDataKey]:
    """Generate a DEK under ``kek``, register it wrapped, and return both.

    The caller must wipe the returned plaintext (``with plain: ...``).
    """
    context = normalise_context(encryption_context)
    with transaction.atomic():
        kek = KeyEncryptionKey.objects.get(pk=kek.pk)
        require_usable(kek)
        plain = provider_for(kek).generate_data_key(kek.provider_key_id, encryption_context=context, key_spec=key_spec)
        row = DataKey.objects.create(
            kek=kek,
            kek_version=plain.key_version,
            wrapped_key=plain.ciphertext,
            fingerprint=wrapped_key_fingerprint(plain.ciphertext),
            key_spec=key_spec,
            encryption_context=context,
            purpose=purpose,
            owner_ref=owner_ref,
        )
        count_data_key_moves({(kek.pk, plain.key_version): 1})
        events.data_key_created(row, actor=actor, kek=kek.name, kek_version=plain.key_version, key_spec=key_spec,
                                owner_ref=owner_ref, context_keys=sorted(context))
    return row, plain


@dataclass(frozen=True)
class DataKeyRequest:
    """One data key of :func:`create_data_keys`: what :func:`create_data_key` takes besides the KEK."""

    encryption_context: Mapping[str, str] | None = None
    purpose: str = ""
    owner_ref: str = ""
    key_spec: str = "AES_256"


def create_data_keys(kek: KeyEncryptionKey, requests: Sequence[DataKeyRequest], *,
                     actor: Actor) -> list[tuple[DataKey, PlainDataKey] | Exception]:
    """:func:`create_data_key` for many, aligned with ``requests``: one transaction, one insert, one audit append.

    Each outcome is the data key and its plaintext (wipe it), or the exception that item met
    (the KEK not usable, the provider refusing); the others are registered. The events are the
    ones each single call records, in order, appended together (``audit.collected``) in the
    same transaction as the rows.
    """
    contexts = [normalise_context(request.encryption_context) for request in requests]
    outcomes: list = []
    try:
        return _create_data_keys(kek, requests, contexts, outcomes, actor)
    except BaseException:
        for outcome in outcomes:  # nothing was registered: no plaintext outlives the failure
            if isinstance(outcome, PlainDataKey):
                outcome.wipe()
        raise


def _create_data_keys(kek: KeyEncryptionKey, requests: Sequence[DataKeyRequest], contexts: list[dict],
                      outcomes: list, actor: Actor) -> list[tuple[DataKey, PlainDataKey] | Exception]:
    with transaction.atomic(), audit.collected():
        kek = KeyEncryptionKey.objects.get(pk=kek.pk)
        try:
            require_usable(kek)
        except KeyNotUsable as exc:
            return [exc] * len(requests)
        provider = provider_for(kek)
        for request, context in zip(requests, contexts, strict=True):
            try:
                outcomes.append(provider.generate_data_key(kek.provider_key_id, encryption_context=context,
                                                           key_spec=request.key_spec))
            except Exception as exc:  # noqa: BLE001 - the item's outcome, as a single call would raise it
                outcomes.append(exc)
        made = [(request, context, plain) for request, context, plain in zip(requests, contexts, outcomes, strict=True)
                if not isinstance(plain, Exception)]
        rows = DataKey.objects.bulk_create([
            DataKey(kek=kek, kek_version=plain.key_version, wrapped_key=plain.ciphertext,
                    fingerprint=wrapped_key_fingerprint(plain.ciphertext), key_spec=request.key_spec,
                    encryption_context=context, purpose=request.purpose, owner_ref=request.owner_ref)
            for request, context, plain in made])
        moves: dict[tuple[int, int], int] = {}
        for row in rows:
            moves[(kek.pk, row.kek_version)] = moves.get((kek.pk, row.kek_version), 0) + 1
        count_data_key_moves(moves)
        for row, (request, context, plain) in zip(rows, made, strict=True):
            events.data_key_created(row, actor=actor, kek=kek.name, kek_version=plain.key_version,
                                    key_spec=request.key_spec, owner_ref=request.owner_ref,
                                    context_keys=sorted(context))
    created = iter(zip(rows, (plain for _, _, plain in made), strict=True))
    return [outcome if isinstance(outcome, Exception) else next(created) for outcome in outcomes]


def _version_usable(data_key: DataKey, states: Mapping[tuple[int, int], str] | None = None) -> None:
    """:raises KeyNotUsable: the data key's KEK version is not enabled (``states``: looked up already)."""
    if states is None:
        states = version_states([data_key])
    state = states.get((data_key.kek_id, data_key.kek_version))
    if state != KeyVersion.State.ENABLED:
        raise KeyNotUsable(f"v{data_key.kek_version} of KEK {data_key.kek.name!r} is {state or 'unknown'}")


def version_states(data_keys: Iterable[DataKey]) -> dict[tuple[int, int], str]:
    """The state of every KEK version these data keys are wrapped under, in one query: ``(kek_id, number) -> state``."""
    wanted = {(row.kek_id, row.kek_version) for row in data_keys}
    if not wanted:
        return {}
    found = KeyVersion.objects.filter(kek_id__in={kek_id for kek_id, _ in wanted},
                                      number__in={number for _, number in wanted})
    return {(kek_id, number): state for kek_id, number, state in found.values_list("kek_id", "number", "state")
            if (kek_id, number) in wanted}


def unwrap_data_key(data_key: DataKey, *, actor: Actor, states: Mapping[tuple[int, int], str] | None = None) -> bytearray:
    """Return the plaintext DEK (a bytearray the caller must wipe), audited.

    A caller unwrapping many data keys passes ``states``, their :func:`version_states` looked
    up once for all of them, instead of one query each.
    """
    kek = data_key.kek
    require_usable(kek)
    _version_usable(data_key, states)
    try:
        opened = provider_for(kek).decrypt(bytes(data_key.wrapped_key), encryption_context=data_key.encryption_context)
    except Exception as exc:
        events.data_key_unwrap_failed(data_key, actor=actor, error=type(exc).__name__)
        raise
    events.data_key_unwrapped(data_key, actor=actor, kek=kek.name, kek_version=opened.key_version)
    return bytearray(opened.plaintext)


def rewrap_data_key(data_key: DataKey, *, actor: Actor) -> DataKey:
    """Re-wrap a DEK under its KEK's primary version; the data key keeps its identity."""
    with transaction.atomic():
        data_key = DataKey.objects.select_for_update().select_related("kek").get(pk=data_key.pk)
        kek = data_key.kek
        require_usable(kek)
        primary = _primary_version(kek)
        if data_key.kek_version == primary.number:
            return data_key
        result = provider_for(kek).rewrap(
            bytes(data_key.wrapped_key), encryption_context=data_key.encryption_context, key_id=kek.provider_key_id
        )
        previous = data_key.kek_version
        data_key.wrapped_key = result.ciphertext
        data_key.fingerprint = wrapped_key_fingerprint(result.ciphertext)
        data_key.kek_version = result.key_version
        data_key.last_rewrapped_at = timezone.now()
        data_key.save(update_fields=["wrapped_key", "fingerprint", "kek_version", "last_rewrapped_at"])
        count_data_key_moves({(kek.pk, previous): -1, (kek.pk, result.key_version): 1})
        events.data_key_rewrapped(data_key, actor=actor, kek=kek.name, from_version=previous,
                                  to_version=result.key_version)
    return data_key


def destroy_data_key(data_key: DataKey, *, replaced_by: DataKey, actor: Actor, reason: str) -> None:
    """Delete a superseded data key's wrapped copy from the registry, for good (after a DEK compromise).

    The owner has re-encrypted its data under ``replaced_by``; removing the old wrapped copy
    means nobody can ask Keyvault to unwrap the compromised DEK again (copies in database
    backups are outside its reach). Refused unless ``replaced_by`` is another, newer data key
    of the same owner that opens now: it is unwrapped through its provider and the plaintext
    wiped at once, so the only data key that opens an owner's data is never the one deleted.

    :raises DataKeyNotSuperseded: no owner, the replacement is this key, older, another owner's,
        or does not open (its KEK or version is not usable, or the provider refuses it).
    :raises ValueError: no reason given.
    """
    if not reason.strip():
        raise ValueError("destroying a data key needs a reason (incident or ticket)")
    with transaction.atomic():
        locked = DataKey.objects.select_for_update().select_related("kek").filter(pk__in=[data_key.pk, replaced_by.pk])
        rows = {row.pk: row for row in locked.order_by("pk")}
        data_key, replacement = rows.get(data_key.pk), rows.get(replaced_by.pk)
        if data_key is None:
            raise DataKeyNotSuperseded("that data key does not exist (already destroyed?)")
        _require_replacement(data_key, replacement)
        fingerprint, kek_name, version = data_key.fingerprint, data_key.kek.name, data_key.kek_version
        target_pk = data_key.pk
        data_key.delete()
        count_data_key_moves({(data_key.kek_id, version): -1})
        data_key.pk = target_pk  # the audit event names the row it removed
        events.data_key_destroyed(data_key, actor=actor, kek=kek_name, kek_version=version,
                                  owner_ref=data_key.owner_ref, fingerprint=fingerprint, replaced_by=replacement.pk,
                                  reason=reason.strip())


def _require_replacement(data_key: DataKey, replacement: DataKey | None) -> None:
    """:raises DataKeyNotSuperseded: ``replacement`` does not take ``data_key``'s place (see :func:`destroy_data_key`)."""
    name = f"data key #{data_key.pk}"
    if not data_key.owner_ref:
        raise DataKeyNotSuperseded(f"{name} has no owner, so no newer data key can be shown to replace it")
    if replacement is None or replacement.pk == data_key.pk:
        raise DataKeyNotSuperseded(f"{name} needs another data key that replaces it")
    if replacement.owner_ref != data_key.owner_ref:
        raise DataKeyNotSuperseded(
            f"data key #{replacement.pk} belongs to {replacement.owner_ref!r}, not {data_key.owner_ref!r}")
    if replacement.pk < data_key.pk:
        raise DataKeyNotSuperseded(f"data key #{replacement.pk} is older than {name}; only a newer one replaces it")
    try:
        require_usable(replacement.kek)
        _version_usable(replacement)
        opened = provider_for(replacement.kek).decrypt(bytes(replacement.wrapped_key),
                                                       encryption_context=replacement.encryption_context)
    except Exception as exc:  # noqa: BLE001 - whatever stops it opening, it cannot replace the old key
        raise DataKeyNotSuperseded(
            f"data key #{replacement.pk} does not open ({type(exc).__name__}), so {name} is still the one that does"
        ) from None
    del opened  # opening it was the check; the plaintext is not used


# -- direct encryption (CLI) -----------------------------------------------------


@dataclass(frozen=True)
class Sealed:
    ciphertext: bytes
    kek: str
    version: int


def encrypt_with_kek(kek: KeyEncryptionKey, plaintext: bytes, *, actor: Actor,
                     encryption_context: Mapping[str, str] | None = None) -> Sealed:
    """Encrypt a small payload directly with a KEK (audited; for operators and scripts)."""
    require_usable(kek)
    result = provider_for(kek).encrypt(kek.provider_key_id, plaintext, encryption_context=encryption_context)
    events.encrypted_with_kek(kek, actor=actor, version=result.key_version, size=len(plaintext),
                              context_keys=sorted(encryption_context or {}))
    return Sealed(result.ciphertext, kek.name, result.key_version)


def decrypt_with_kek_ciphertext(ciphertext: bytes, *, actor: Actor, provider_name: str | None = None,
                                encryption_context: Mapping[str, str] | None = None) -> bytes:
    """Decrypt a ciphertext from :func:`encrypt_with_kek`; the KEK is found from the ciphertext.

    Failures are audited too (outcome ``failure``) before the error propagates.
    """
    provider = get_provider(provider_name)
    try:
        opened = provider.decrypt(ciphertext, encryption_context=encryption_context)
        kek = KeyEncryptionKey.objects.filter(provider=provider.name, provider_key_id=opened.key_id).first()
        if kek is not None:
            require_usable(kek)
            if KeyVersion.objects.filter(kek=kek, number=opened.key_version).exclude(state=KeyVersion.State.ENABLED).exists():
                raise KeyNotUsable(f"v{opened.key_version} of KEK {kek.name!r} is retired")
    except Exception as exc:
        events.decrypt_failed(actor=actor, provider=provider.name, error=type(exc).__name__)
        raise
    events.decrypted_with_kek(kek or ("provider-key", opened.key_id), actor=actor, version=opened.key_version,
                              size=len(opened.plaintext))
    return opened.plaintext


def rewrap_field_values(model, field_name: str, *, actor: Actor, batch_size: int) -> int:
    """Move one encrypted model field's values to their KEKs' primary versions, and audit how many moved.

    :raises django.core.exceptions.FieldError: the field is not encrypted.
    """
    count = rewrap_field(model, field_name, batch_size=batch_size)
    label = f"{model._meta.label_lower}.{field_name}"
    events.field_rewrapped(label, actor=actor, rewrapped=count)
    return count
