"""Check a restored instance: every data key opens under its KEK, and the audit chain verifies.

A backup of Keyvault is several pieces kept apart (``docs/ops/backup.md``): the database,
the local keyring, its master key, the audit witness and the audit keys. Restored
pieces that do not belong together fail quietly and late: a database newer than the
keyring holds data keys wrapped under KEK versions the keyring never had; a keyring
newer than the database may have retired the versions the database's data keys still
use. :func:`verify_restore` finds both before anyone relies on the restore.

It opens every :class:`~keyvault.models.DataKey` through its KEK's provider, in id
order and in batches of :data:`BATCH_SIZE` (the plaintext is dropped at once, never
kept, logged or returned), tallies the outcome per KEK and version with a typed
reason for each failure, compares each KEK's versions in the inventory with those
its provider holds, and then runs the same full audit verification as
``manage.py audit verify`` (:func:`keyvault.audit.status.verify_fully`).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from keyvault import audit
from keyvault.audit import Actor, events
from keyvault.audit import status as audit_status
from keyvault.kms import (
    InvalidCiphertext,
    KeyDisabled,
    KeyInfo,
    KeyNotFound,
    KMSError,
    KMSProvider,
    ProviderUnavailable,
    VersionState,
    get_provider,
)
from keyvault.kms.bulk import map_bounded
from keyvault.models import DataKey, KeyEncryptionKey, KeyVersion

#: Data keys read from the database and opened per batch.
BATCH_SIZE = 500
#: Data key ids named per KEK, version and reason (the counts are always complete).
NAMED_PER_GROUP = 20


class Failure(enum.StrEnum):
    """Why a data key (or a KEK version) of the restored database cannot be opened."""

    VERSION_MISSING = "version_missing"
    VERSION_RETIRED = "version_retired"
    KEY_MISSING = "key_missing"
    WRONG_CONTEXT = "wrong_context"
    VERSION_MISMATCH = "version_mismatch"
    KEY_DISABLED = "key_disabled"
    PROVIDER_UNAVAILABLE = "provider_unavailable"

    @property
    def explanation(self) -> str:
        return _EXPLANATIONS[self]


_EXPLANATIONS = {
    Failure.VERSION_MISSING: "KEK version missing from the keyring: wrapped after this keyring backup was taken "
                             "(keyring older than database)",
    Failure.VERSION_RETIRED: "the provider holds the KEK version but it is disabled or destroyed there: retired after "
                             "this database backup was taken (keyring newer than database)",
    Failure.KEY_MISSING: "the provider has no such key: the keyring predates the KEK, or it is another keyring "
                         "or provider account",
    Failure.WRONG_CONTEXT: "does not open under its version with its stored encryption context (wrong context, "
                           "damaged ciphertext, or another key with the same id)",
    Failure.VERSION_MISMATCH: "opened under another KEK version than the database records",
    Failure.KEY_DISABLED: "the KEK is enabled in the database but disabled at the provider",
    Failure.PROVIDER_UNAVAILABLE: "the provider is not configured, could not be reached or refused access",
}


class Skip(enum.StrEnum):
    """Data keys not checked, on purpose: the restored inventory itself says they cannot be opened."""

    KEK_NOT_ENABLED = "kek_not_enabled"
    VERSION_NOT_ENABLED = "version_not_enabled"


@dataclass
class VersionTally:
    """The outcome for the data keys of one KEK version."""

    kek: str
    version: int
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    named: dict[str, list[int]] = field(default_factory=dict)

    def fail(self, reason: Failure, data_key_id: int) -> None:
        self.failed[reason] += 1
        names = self.named.setdefault(reason.value, [])
        if len(names) < NAMED_PER_GROUP:
            names.append(data_key_id)

    def as_dict(self) -> dict:
        return {"kek": self.kek, "version": self.version, "ok": self.ok,
                "failed": {reason.value: count for reason, count in sorted(self.failed.items())},
                "skipped": {reason.value: count for reason, count in sorted(self.skipped.items())},
                "failed_data_keys": self.named}


@dataclass(frozen=True)
class Finding:
    """A difference between a KEK's versions in the database and at its provider."""

    kek: str
    version: int | None
    reason: Failure | None  # None: a warning, not a failure
    detail: str

    def as_dict(self) -> dict:
        return {"kek": self.kek, "version": self.version, "reason": self.reason.value if self.reason else None,
                "failure": self.reason is not None, "detail": self.detail}


@dataclass
class RestoreReport:
    """What :func:`verify_restore` found; ``ok`` only when nothing failed."""

    tallies: dict[tuple[str, int], VersionTally] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    audit: audit.VerifyResult | None = None

    def tally(self, kek: str, version: int) -> VersionTally:
        return self.tallies.setdefault((kek, version), VersionTally(kek, version))

    @property
    def checked(self) -> int:
        return sum(t.ok + sum(t.failed.values()) for t in self.tallies.values())

    @property
    def opened(self) -> int:
        return sum(t.ok for t in self.tallies.values())

    @property
    def failed(self) -> int:
        return sum(sum(t.failed.values()) for t in self.tallies.values())

    @property
    def skipped(self) -> int:
        return sum(sum(t.skipped.values()) for t in self.tallies.values())

    @property
    def ok(self) -> bool:
        return (not self.failed and not any(f.reason for f in self.findings)
                and self.audit is not None and self.audit.ok)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "data_keys": {"checked": self.checked, "ok": self.opened, "failed": self.failed, "skipped": self.skipped},
            "versions": [self.tallies[key].as_dict() for key in sorted(self.tallies)],
            "findings": [finding.as_dict() for finding in self.findings],
            "reasons": {reason.value: reason.explanation for reason in Failure},
            "audit": {"ok": self.audit.ok, "result": str(self.audit)} if self.audit else None,
        }

    def lines(self) -> Iterable[str]:
        """The report as text, one line per KEK version, failure reason and finding."""
        yield (f"data keys: {self.opened} ok, {self.failed} failed, {self.skipped} skipped "
               f"(of {self.checked + self.skipped})")
        for key in sorted(self.tallies):
            tally = self.tallies[key]
            word = "FAILED" if tally.failed else "ok"
            yield f"  {tally.kek} v{tally.version}: {word} — {tally.ok} ok, {sum(tally.failed.values())} failed" + (
                f", {sum(tally.skipped.values())} skipped" if tally.skipped else "")
            for reason, count in sorted(tally.failed.items()):
                ids = tally.named[reason.value]
                more = f" and {count - len(ids)} more" if count > len(ids) else ""
                yield (f"    {count} {reason.value}: {reason.explanation}; data keys "
                       f"{', '.join(f'#{i}' for i in ids)}{more}")
            for reason, count in sorted(tally.skipped.items()):
                yield f"    {count} skipped ({reason.value.replace('_', ' ')} in the restored inventory)"
        for finding in self.findings:
            where = f"{finding.kek} v{finding.version}" if finding.version is not None else finding.kek
            yield f"  {'FAILED' if finding.reason else 'warning'}: {where}: {finding.detail}"
        if self.audit is not None:
            yield f"audit: {self.audit}"
        yield "OK: restore verified" if self.ok else "FAILED: restore NOT verified"


@dataclass(frozen=True)
class _KekState:
    """A KEK of the restored inventory and what its provider says about it."""

    name: str
    provider: KMSProvider | None
    info: KeyInfo | None
    unusable: Failure | None  # the whole KEK cannot be checked at its provider
    enabled: bool
    retired_versions: frozenset[int]

    def classify(self, error: KMSError, version: int) -> Failure:
        """The reason for a data key that did not open (the provider's own error says little, on purpose)."""
        if isinstance(error, KeyNotFound):
            return Failure.KEY_MISSING
        if isinstance(error, KeyDisabled):
            return Failure.KEY_DISABLED
        if isinstance(error, InvalidCiphertext):
            return _version_failure(self.info, version) or Failure.WRONG_CONTEXT
        return Failure.PROVIDER_UNAVAILABLE  # unavailable, access denied, misconfigured


def _version_failure(info: KeyInfo | None, version: int) -> Failure | None:
    """Whether the provider lacks ``version`` or has retired it (None: it holds it, enabled)."""
    if info is None:
        return None
    try:
        state = info.version(version).state
    except KeyError:
        return Failure.VERSION_MISSING
    return None if state == VersionState.ENABLED else Failure.VERSION_RETIRED


def _kek_state(kek: KeyEncryptionKey, report: RestoreReport) -> _KekState:
    """What the provider holds of ``kek``, with any difference from the inventory added to ``report``.

    The differences of a KEK that is not enabled (its data keys are skipped) are warnings.
    """
    if kek.state == KeyEncryptionKey.State.DESTROYED:
        return _KekState(kek.name, None, None, None, False, frozenset())
    found: list[Finding] = []
    state = _compare_with_provider(kek, found)
    if state.enabled:
        report.findings.extend(found)
    else:
        report.findings.extend(Finding(f.kek, f.version, None, f"KEK {kek.state.replace('_', ' ')}: {f.detail}")
                               for f in found)
    return state


def _compare_with_provider(kek: KeyEncryptionKey, found: list[Finding]) -> _KekState:
    versions = {v.number: v.state for v in KeyVersion.objects.filter(kek=kek)}
    retired = frozenset(n for n, state in versions.items() if state != KeyVersion.State.ENABLED)
    enabled = kek.state == KeyEncryptionKey.State.ENABLED
    try:
        provider = get_provider(kek.provider)
        info = provider.describe_key(kek.provider_key_id)
    except KeyNotFound:
        found.append(Finding(kek.name, None, Failure.KEY_MISSING,
                             f"provider {kek.provider!r} has no key {kek.provider_key_id!r}"))
        return _KekState(kek.name, None, None, Failure.KEY_MISSING, enabled, retired)
    except KMSError as exc:  # not configured here, unreachable, access refused, keyring unreadable
        found.append(Finding(kek.name, None, Failure.PROVIDER_UNAVAILABLE,
                             f"provider {kek.provider!r}: {type(exc).__name__}: {exc}"))
        return _KekState(kek.name, None, None, Failure.PROVIDER_UNAVAILABLE, enabled, retired)
    for number, state in sorted(versions.items()):
        if state == KeyVersion.State.DESTROYED:
            continue
        problem = _version_failure(info, number)
        if problem is Failure.VERSION_MISSING:
            found.append(Finding(kek.name, number, problem, f"the database has v{number} ({state}) but "
                                 f"provider {kek.provider!r} does not: keyring older than database"))
        elif problem is Failure.VERSION_RETIRED and state == KeyVersion.State.ENABLED:
            found.append(Finding(kek.name, number, problem, f"v{number} is enabled in the database but "
                                 f"{info.version(number).state} at provider {kek.provider!r}: keyring "
                                 "newer than database"))
    unknown = sorted(v.version for v in info.versions if v.version not in versions)
    if unknown:
        found.append(Finding(kek.name, None, None, (
            f"provider {kek.provider!r} holds {', '.join(f'v{n}' for n in unknown)}, which the database does not "
            "know: the database is older than the keyring (data keys wrapped after the database backup are not "
            "in it)")))
    return _KekState(kek.name, provider, info, None, enabled, retired)


def check_data_keys(report: RestoreReport, *, kek_names: Iterable[str] = (), batch_size: int = BATCH_SIZE,
                    progress: Callable[[int, int], None] | None = None) -> None:
    """Open every data key (of ``kek_names``, or all) through its provider; tally into ``report``.

    Reads in id order, ``batch_size`` rows at a time, so memory stays flat on millions
    of rows; a remote provider gets its batch with as many requests in flight as it is
    configured for (``HMD_AWS_KMS_CONCURRENCY`` …). ``progress(done, total)`` is called
    after each batch.
    """
    keks = KeyEncryptionKey.objects.order_by("pk")
    if kek_names:
        keks = keks.filter(name__in=list(kek_names))
    states = {kek.pk: _kek_state(kek, report) for kek in keks}
    rows = DataKey.objects.filter(kek_id__in=list(states)).order_by("pk")
    total, done, after = rows.count(), 0, 0
    while True:
        batch = list(rows.filter(pk__gt=after).values_list(
            "pk", "kek_id", "kek_version", "wrapped_key", "encryption_context")[:batch_size])
        if not batch:
            break
        by_kek: dict[int, list[tuple[int, int, bytes, dict]]] = {}
        for pk, kek_id, version, wrapped, context in batch:
            by_kek.setdefault(kek_id, []).append((pk, version, bytes(wrapped), context))
        for kek_id, items in by_kek.items():
            _check(report, states[kek_id], items)
        after, done = batch[-1][0], done + len(batch)
        if progress is not None:
            progress(done, total)


def _check(report: RestoreReport, kek: _KekState, items: list[tuple[int, int, bytes, dict]]) -> None:
    """Tally one KEK's share of a batch: skipped by the inventory, failed for the whole KEK, or opened."""
    to_open = []
    for pk, version, wrapped, context in items:
        tally = report.tally(kek.name, version)
        if not kek.enabled:
            tally.skipped[Skip.KEK_NOT_ENABLED] += 1
        elif version in kek.retired_versions:
            tally.skipped[Skip.VERSION_NOT_ENABLED] += 1
        elif kek.unusable is not None:
            tally.fail(kek.unusable, pk)
        else:
            to_open.append((pk, version, wrapped, context))
    for (pk, version, _, _), outcome in zip(to_open, _open_all(kek.provider, to_open), strict=True):
        tally = report.tally(kek.name, version)
        if isinstance(outcome, KMSError):
            tally.fail(kek.classify(outcome, version), pk)
        elif outcome != version:
            tally.fail(Failure.VERSION_MISMATCH, pk)
        else:
            tally.ok += 1


def _open_all(provider: KMSProvider, items: list[tuple[int, int, bytes, dict]]) -> list[int | KMSError]:
    """The KEK version each data key opened under, or the error it met; the plaintexts are dropped at once."""

    def opened_version(item: tuple[int, int, bytes, dict]) -> int:
        return provider.decrypt(item[2], encryption_context=item[3]).key_version

    try:
        return map_bounded(opened_version, items, concurrency=getattr(provider, "concurrency", 1))
    except ProviderUnavailable as exc:  # the provider is down for the whole batch: every item says so
        return [exc] * len(items)


def verify_restore(*, actor: Actor, kek_names: Iterable[str] = (), batch_size: int = BATCH_SIZE,
                   witness: str | None = None, use_witness: bool = True, jobs: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> RestoreReport:
    """Check a restored instance: every data key opens, every KEK version is at its provider, the chain verifies.

    Records one audit event for the data-key sweep (counts only), then verifies the
    whole chain, that event included, as ``manage.py audit verify`` does (against
    ``witness``, a copy of the witness, when given).
    """
    report = RestoreReport()
    check_data_keys(report, kek_names=kek_names, batch_size=batch_size, progress=progress)
    events.data_keys_verified(actor=actor, checked=report.checked, ok=report.opened, failed=report.failed,
                              skipped=report.skipped,
                              failures={f"{t.kek} v{t.version}": {r.value: n for r, n in sorted(t.failed.items())}
                                        for t in report.tallies.values() if t.failed})
    report.audit = audit_status.verify_fully(actor=actor, jobs=jobs, witness=witness, use_witness=use_witness,
                                             throttle=False)
    return report
