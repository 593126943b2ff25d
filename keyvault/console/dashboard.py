"""The console home: what needs attention, as plain data (the view renders it, ``reports`` reuses it).

Everything here reads; nothing writes. Each panel is one small query or one
query per KEK (coverage uses the ``(kek, kek_version, id)`` index), so the page
stays fast with many data keys. Times are passed in (``now``) so tests can freeze them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.apps import apps
from django.db.models import Count, Q
from django.db.models.functions import TruncMonth
from django.utils import timezone

from keyvault.keys import services
from keyvault.models import AuditEvent, KeyEncryptionKey, KeyVersion
from rotation import services as rotation_services
from rotation.models import NIST_MAX_ORIGINATOR_DAYS, RotationPolicy, RotationRun

#: NIST SP 800-57 Pt 1 Rev 5 §5.3.6: recipient usage ends no more than 3 years after originator usage began.
NIST_MAX_RECIPIENT_DAYS = 3 * 365
DUE_SOON_DAYS = (7, 30)
CERTIFICATE_HORIZON_DAYS = 90
MONTHS_SHOWN = 12
LIVE_KEK_STATES = (KeyEncryptionKey.State.ENABLED, KeyEncryptionKey.State.DISABLED)


@dataclass(frozen=True)
class DueItem:
    """A target whose rotation is due (or overdue)."""

    target: str
    kek: str
    due_at: datetime
    days_left: int  # whole days until due, rounded down: negative once overdue
    period: timedelta | None
    active_run: str = ""
    overdue_days: int = 0  # whole days since it fell due

    @property
    def overdue(self) -> bool:
        return self.days_left < 0


@dataclass(frozen=True)
class CryptoperiodItem:
    """A key version used beyond its cryptoperiod."""

    kek: str
    version: int
    created_at: datetime
    age_days: int
    limit_days: int
    rule: str  # "originator" (primary still encrypting) or "recipient" (old version still decrypting)
    source: str  # where the limit comes from: "policy" or "NIST SP 800-57"


@dataclass(frozen=True)
class CoverageItem:
    kek: str
    primary: int | None
    total: int
    on_primary: int

    @property
    def share(self) -> float | None:
        """Percent of the data keys on the primary version; None when the KEK wraps no data keys."""
        return round(100.0 * self.on_primary / self.total, 1) if self.total else None


@dataclass(frozen=True)
class PendingDeletionItem:
    """A KEK scheduled for deletion: when it is destroyed and what it still wraps."""

    kek_id: int
    kek: str
    deletion_date: datetime
    days_left: int  # days left, a started day counted whole (7 right after scheduling 7; 0: due, the sweep destroys it)
    data_keys: int


@dataclass(frozen=True)
class RunItem:
    run_id: int
    target: str
    kind: str
    state: str
    created_at: datetime
    problem: str


@dataclass(frozen=True)
class CertificateItem:
    name: str
    expires_at: datetime
    days_left: int
    status: str


@dataclass
class Dashboard:
    """Everything the console home shows."""

    now: datetime
    keks_total: int
    keys_by_state: list[tuple[str, str, int]]
    keys_by_provider: list[tuple[str, int]]
    due: list[DueItem]
    past_cryptoperiod: list[CryptoperiodItem]
    coverage: list[CoverageItem]
    problem_runs: list[RunItem]
    rotations_per_month: list[tuple[str, int]]
    certificates: list[CertificateItem] = field(default_factory=list)
    certificates_available: bool = False
    chain_status: object | None = None
    pending_deletions: list[PendingDeletionItem] = field(default_factory=list)

    @property
    def overdue(self) -> list[DueItem]:
        return [item for item in self.due if item.overdue]

    def due_within(self, days: int) -> list[DueItem]:
        return [item for item in self.due if 0 <= item.days_left and item.due_at <= self.now + timedelta(days=days)]

    @property
    def due_7(self) -> list[DueItem]:
        return self.due_within(7)

    @property
    def due_30(self) -> list[DueItem]:
        return self.due_within(30)

    @property
    def keks_without_data_keys(self) -> list[CoverageItem]:
        return [item for item in self.coverage if item.share is None]

    @property
    def low_coverage(self) -> list[CoverageItem]:
        return [item for item in self.coverage if item.share is not None and item.share < 100.0]


# -- panels --------------------------------------------------------------------------


def keys_by_state() -> list[tuple[str, str, int]]:
    counts = dict(KeyEncryptionKey.objects.values_list("state").annotate(n=Count("id")).order_by())
    return [(state.value, state.label, counts.get(state.value, 0)) for state in KeyEncryptionKey.State]


def keys_by_provider() -> list[tuple[str, int]]:
    rows = KeyEncryptionKey.objects.exclude(state=KeyEncryptionKey.State.DESTROYED)
    return list(rows.values_list("provider").annotate(n=Count("id")).order_by("provider"))


def _days_between(later: datetime, earlier: datetime) -> int:
    """Whole days from ``earlier`` to ``later``, rounded towards minus infinity (so 1 s overdue is -1)."""
    return (later - earlier) // timedelta(days=1)


def _has_field(model, name: str) -> bool:
    return any(f.name == name for f in model._meta.get_fields())


def _due(target: str, kek: str, due_at: datetime, now: datetime, period, active_run: str = "") -> DueItem:
    return DueItem(target=target, kek=kek, due_at=due_at, days_left=_days_between(due_at, now), period=period,
                   active_run=active_run, overdue_days=max(0, _days_between(now, due_at)) if due_at < now else 0)


def due_rotations(*, now: datetime, horizon_days: int = max(DUE_SOON_DAYS), kek: str = "") -> list[DueItem]:
    """Rotations overdue or due within ``horizon_days``, by their policies' ``next_due_at``.

    A KEK without a policy yet (the sweep gives it one) counts with the policy it will get.
    Only enabled KEKs are rotated, so only they count. Soonest first.
    """
    horizon = now + timedelta(days=horizon_days)
    active = dict(
        RotationRun.objects.filter(state__in=RotationRun.ACTIVE_STATES, kek__isnull=False)
        .values_list("kek_id", "id")
    )
    items: list[DueItem] = []
    policies = RotationPolicy.objects.select_related("kek").filter(
        kek__state=KeyEncryptionKey.State.ENABLED, next_due_at__lte=horizon
    )
    if kek:
        policies = policies.filter(kek__name=kek)
    unpolicied = KeyEncryptionKey.objects.filter(state=KeyEncryptionKey.State.ENABLED, rotation_policy__isnull=True)
    if kek:
        unpolicied = unpolicied.filter(name=kek)
    planned = (rotation_services.policy_of(row) for row in unpolicied)
    for policy in [*policies, *(p for p in planned if p.next_due_at <= horizon)]:
        run = active.get(policy.kek_id)
        items.append(_due(f"KEK {policy.kek.name}", policy.kek.name, policy.next_due_at, now, policy.period,
                          f"#{run}" if run else ""))
    if not kek and _has_field(RotationPolicy, "secret"):
        # Managed secrets (another target type) have policies too.
        secret_policies = RotationPolicy.objects.select_related("secret").filter(
            secret__isnull=False, next_due_at__lte=horizon
        )
        for policy in secret_policies:
            items.append(_due(policy.target_label, "", policy.next_due_at, now, policy.period))
    return sorted(items, key=lambda item: (item.due_at, item.target))


def past_cryptoperiod(*, now: datetime, kek: str = "") -> list[CryptoperiodItem]:
    """Versions used beyond their cryptoperiod.

    Originator usage: the primary version encrypts; its limit is the KEK's policy
    period when it has a policy, else NIST SP 800-57's ~2 years. Recipient usage:
    an older version still enabled (decrypting) more than 3 years after it was made.
    """
    periods = dict(RotationPolicy.objects.filter(kek__isnull=False).values_list("kek_id", "period"))
    versions = KeyVersion.objects.select_related("kek").filter(
        kek__state__in=LIVE_KEK_STATES, state=KeyVersion.State.ENABLED
    )
    if kek:
        versions = versions.filter(kek__name=kek)
    oldest_primary = now - min([timedelta(days=NIST_MAX_ORIGINATOR_DAYS), *periods.values()])
    versions = versions.filter(
        Q(is_primary=True, created_at__lt=oldest_primary)
        | Q(is_primary=False, created_at__lt=now - timedelta(days=NIST_MAX_RECIPIENT_DAYS))
    )
    items = []
    for version in versions.order_by("kek__name", "number"):
        age = now - version.created_at
        if version.is_primary:
            policy_period = periods.get(version.kek_id)
            limit = policy_period if policy_period is not None else timedelta(days=NIST_MAX_ORIGINATOR_DAYS)
            source = "policy" if policy_period is not None else "NIST SP 800-57"
            rule = "originator"
        else:
            limit, source, rule = timedelta(days=NIST_MAX_RECIPIENT_DAYS), "NIST SP 800-57", "recipient"
        if age > limit:
            items.append(CryptoperiodItem(kek=version.kek.name, version=version.number, created_at=version.created_at,
                                          age_days=age.days, limit_days=max(0, limit.days), rule=rule, source=source))
    return items


def coverage(*, kek: str = "") -> list[CoverageItem]:
    """Share of each live KEK's data keys wrapped by its primary version (``services.coverage_by_kek``)."""
    keks = KeyEncryptionKey.objects.filter(state__in=LIVE_KEK_STATES).order_by("name")
    if kek:
        keks = keks.filter(name=kek)
    primaries = dict(KeyVersion.objects.filter(is_primary=True, kek__in=keks).values_list("kek_id", "number"))
    keks = list(keks)
    coverage = services.coverage_by_kek(row.pk for row in keks)
    items = []
    for row in keks:
        counts = coverage.get(row.pk, {})
        primary = primaries.get(row.pk)
        items.append(CoverageItem(kek=row.name, primary=primary, total=sum(counts.values()),
                                  on_primary=counts.get(primary, 0)))
    return items


def pending_deletions(*, now: datetime) -> list[PendingDeletionItem]:
    """KEKs pending deletion, soonest destroyed first, with the data keys each still wraps."""
    keks = (KeyEncryptionKey.objects.filter(state=KeyEncryptionKey.State.PENDING_DELETION)
            .annotate(n=Count("data_keys")).order_by("deletion_date", "name"))
    return [
        PendingDeletionItem(kek_id=row.pk, kek=row.name, deletion_date=row.deletion_date,
                            days_left=max(0, -_days_between(now, row.deletion_date)) if row.deletion_date else 0,
                            data_keys=row.n)
        for row in keks
    ]


def problem_runs(*, since: datetime | None = None, until: datetime | None = None, kek: str = "") -> list[RunItem]:
    """Failed runs, and active runs paused because something (a provider) is down."""
    runs = RotationRun.objects.select_related("kek").filter(
        Q(state=RotationRun.State.FAILED) | (Q(state__in=RotationRun.ACTIVE_STATES) & ~Q(paused_reason=""))
    )
    if since:
        runs = runs.filter(created_at__gte=since)
    if until:
        runs = runs.filter(created_at__lt=until)
    if kek:
        runs = runs.filter(kek__name=kek)
    items = []
    for run in runs.order_by("-created_at"):
        if run.state == RotationRun.State.FAILED:
            problem = f"failed: {run.last_error or 'no error recorded'}"
        else:
            problem = f"paused: {run.paused_reason}"
        items.append(RunItem(run_id=run.pk, target=run.target_label, kind=run.get_kind_display(),
                             state=run.get_state_display(), created_at=run.created_at, problem=problem[:500]))
    return items


def _month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def rotations_per_month(*, now: datetime, months: int = MONTHS_SHOWN) -> list[tuple[str, int]]:
    """New KEK versions (each one a rotation, by a run or by hand) per calendar month (UTC), oldest first."""
    first = _month_start(now)
    for _ in range(months - 1):
        first = _month_start(first - timedelta(days=1))
    rows = (
        KeyVersion.objects.filter(number__gt=1, created_at__gte=first)
        .annotate(month=TruncMonth("created_at", tzinfo=UTC))
        .values_list("month")
        .annotate(n=Count("id"))
        .order_by()
    )
    counts = Counter({(month.year, month.month): n for month, n in rows})
    result = []
    cursor = first
    for _ in range(months):
        result.append((f"{cursor:%b %y}", counts.get((cursor.year, cursor.month), 0)))
        cursor = _month_start(cursor + timedelta(days=32))
    return result


def certificate_model():
    """The ManagedSecret model when it is installed and has what we need, else None."""
    if not apps.is_installed("keyvault"):
        return None
    try:
        model = apps.get_model("keyvault", "ManagedSecret")
    except LookupError:
        return None
    if not (_has_field(model, "expires_at") and _has_field(model, "secret_type")):
        return None
    return model


def expiring_certificates(*, now: datetime, days: int = CERTIFICATE_HORIZON_DAYS) -> list[CertificateItem] | None:
    """TLS certificates expiring within ``days`` (or expired), soonest first; None if secrets are not managed here."""
    model = certificate_model()
    if model is None:
        return None
    rows = model.objects.filter(secret_type="tls_certificate", expires_at__isnull=False,
                                expires_at__lte=now + timedelta(days=days)).order_by("expires_at", "name")
    return [
        CertificateItem(name=row.name, expires_at=row.expires_at, days_left=_days_between(row.expires_at, now),
                        status=getattr(row, "get_status_display", lambda: "")())
        for row in rows
    ]


RECENT_EVENTS = 10


def recent_events_of(user, *, limit: int = RECENT_EVENTS) -> list:
    """The audit events ``user`` caused, newest first (the home page's "Your recent activity")."""
    return list(AuditEvent.objects.filter(actor=f"user:{user.get_username()}").order_by("-sequence")[:limit])


def build(*, now: datetime | None = None, chain_status: bool = True) -> Dashboard:
    """Collect every panel of the console home."""
    now = now or timezone.now()
    certificates = expiring_certificates(now=now)
    status = None
    if chain_status:
        from keyvault.audit.status import chain_status as recorded_chain_status

        status = recorded_chain_status()
    by_state = keys_by_state()
    return Dashboard(
        now=now,
        keks_total=sum(count for _, _, count in by_state),
        keys_by_state=by_state,
        keys_by_provider=keys_by_provider(),
        due=due_rotations(now=now),
        past_cryptoperiod=past_cryptoperiod(now=now),
        coverage=coverage(),
        problem_runs=problem_runs(),
        rotations_per_month=rotations_per_month(now=now),
        certificates=certificates or [],
        certificates_available=certificates is not None,
        chain_status=status,
        pending_deletions=pending_deletions(now=now),
    )
