"""Rotation policies, runs, their runbook steps and approvals."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from keyvault.models import KeyEncryptionKey, ManagedSecret

#: NIST SP 800-57 Pt 1 Rev 5 §5.3.6: originator-usage period of symmetric data/key-wrapping keys, about 2 years.
NIST_MAX_ORIGINATOR_DAYS = 730
MIN_PERIOD = timedelta(minutes=1)
#: A new policy's period unless its creator or driver says otherwise.
DEFAULT_PERIOD = timedelta(days=365)
_SHORT_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_period(text: str) -> timedelta:
    """``90d``, ``12h``, ``5m``, ``2w``, ``30s`` or an ISO 8601 / Django duration (``P90D``, ``5 00:00:00``).

    :raises ValueError: anything else.
    """
    from django.utils.dateparse import parse_duration

    match = _SHORT_DURATION.match(text or "")
    try:
        if match:
            return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        parsed = parse_duration((text or "").strip())
    except OverflowError:
        raise ValueError(f"duration out of range: {text[:40]!r}") from None
    if parsed is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90d, 12h, 5m or P90D)")
    return parsed


def format_period(value: timedelta) -> str:
    """The shortest exact ``parse_period`` spelling of ``value``."""
    seconds = int(value.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
#: NIST SP 800-38D §8.3: at most 2**32 random-nonce encryptions per key.
NIST_MAX_GCM_ENCRYPTIONS = 2**32


class RotationPolicy(models.Model):
    """When and how a target is rotated. One policy per target."""

    kek = models.OneToOneField(
        KeyEncryptionKey, on_delete=models.CASCADE, related_name="rotation_policy", verbose_name="key-encryption key",
        null=True, blank=True, help_text="The KEK this policy rotates.",
    )
    secret = models.OneToOneField(
        ManagedSecret, on_delete=models.CASCADE, related_name="rotation_policy", verbose_name="managed secret",
        null=True, blank=True, help_text="The managed secret this policy rotates (instead of a KEK).",
    )
    period = models.DurationField(
        "period", default=DEFAULT_PERIOD, validators=[MinValueValidator(MIN_PERIOD)],
        help_text="Rotate this long after the last rotation (e.g. 365 days; as short as 1 minute for drills). "
        "NIST SP 800-57 suggests at most about 2 years for KEKs.",
    )
    usage_threshold = models.PositiveBigIntegerField(
        "usage threshold", null=True, blank=True,
        help_text="Also rotate once the primary version has made this many encryptions (empty: no usage trigger).",
    )
    window_weekdays = models.CharField(
        "allowed weekdays", max_length=20, blank=True,
        help_text="Comma-separated ISO weekdays (1 = Monday … 7 = Sunday) when automatic runs may start; empty: any day.",
    )
    window_start = models.TimeField("window start (UTC)", null=True, blank=True)
    window_end = models.TimeField("window end (UTC)", null=True, blank=True, help_text="Empty start and end: any time.")
    auto = models.BooleanField("automatic", default=True, help_text="Start planned runs by itself when due.")
    approvals_required = models.PositiveSmallIntegerField(
        "approvals required", default=0, validators=[MaxValueValidator(2)],
        help_text="Distinct approvers (0, 1 or 2) a run needs before it starts; never the initiator.",
    )
    grace_period = models.DurationField(
        "grace period", default=timedelta(days=7), validators=[MinValueValidator(timedelta(0))],
        help_text="Old versions stay enabled this long after every data key is rewrapped, then are disabled.",
    )
    next_due_at = models.DateTimeField("next due", null=True, blank=True, db_index=True)
    created_at = models.DateTimeField("created", auto_now_add=True)
    updated_at = models.DateTimeField("updated", auto_now=True)

    class Meta:
        """A policy names exactly one target."""

        verbose_name = "rotation policy"
        verbose_name_plural = "rotation policies"
        constraints = [
            models.CheckConstraint(
                condition=Q(kek__isnull=False, secret__isnull=True) | Q(kek__isnull=True, secret__isnull=False),
                name="rotationpolicy_has_target",
            )
        ]

    def __str__(self) -> str:
        return f"policy for {self.target_label}"

    @property
    def target_label(self) -> str:
        if self.kek_id:
            return f"KEK {self.kek.name}"
        return f"secret {self.secret.name}" if self.secret_id else "?"

    @property
    def target(self):
        """The KEK or managed secret this policy (or run) is about."""
        return self.kek if self.kek_id else self.secret

    def clean(self) -> None:
        if (self.window_start is None) != (self.window_end is None):
            raise ValidationError("Give both window start and end, or neither.")
        for day in self.weekdays():
            if not 1 <= day <= 7:
                raise ValidationError({"window_weekdays": "Weekdays are 1 (Monday) to 7 (Sunday)."})

    def weekdays(self) -> list[int]:
        try:
            return [int(part) for part in self.window_weekdays.split(",") if part.strip()]
        except ValueError:
            raise ValidationError({"window_weekdays": "Use numbers 1-7 separated by commas."}) from None

    def in_window(self, now: datetime) -> bool:
        """Whether an automatic run may start at ``now`` (UTC)."""
        days = self.weekdays()
        if days and now.isoweekday() not in days:
            return False
        if self.window_start is None or self.window_end is None:
            return True
        moment = now.time().replace(tzinfo=None)
        if self.window_start <= self.window_end:
            return self.window_start <= moment < self.window_end
        return moment >= self.window_start or moment < self.window_end  # window across midnight

    def warnings(self) -> list[str]:
        """Where this policy goes beyond NIST guidance."""
        found = []
        if self.period > timedelta(days=NIST_MAX_ORIGINATOR_DAYS):
            found.append(
                f"Period of {self.period.days} days exceeds the ~2-year originator-usage period NIST SP 800-57 suggests."
            )
        if self.usage_threshold and self.usage_threshold > NIST_MAX_GCM_ENCRYPTIONS:
            found.append("Usage threshold exceeds 2^32 encryptions, the NIST SP 800-38D limit for AES-GCM.")
        return found



class RotationRun(models.Model):
    """One rotation of one target, from request to retirement of the old version."""

    class Kind(models.TextChoices):
        PLANNED = "planned", "Planned"
        ON_DEMAND = "on_demand", "On demand"
        EMERGENCY = "emergency", "Emergency"
        MIGRATE = "migrate", "Migrate to another provider"

    class State(models.TextChoices):
        PENDING_APPROVAL = "pending_approval", "Pending approval"
        QUEUED = "queued", "Queued"
        ROTATING = "rotating", "Rotating"
        REWRAPPING = "rewrapping", "Rewrapping"
        VERIFYING = "verifying", "Verifying"
        RETIRING = "retiring", "Retiring old versions"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"
        ROLLED_BACK = "rolled_back", "Rolled back"

    ACTIVE_STATES = (
        State.PENDING_APPROVAL, State.QUEUED, State.ROTATING, State.REWRAPPING, State.VERIFYING, State.RETIRING,
    )
    #: States that keep another run of the same target from starting. A run waiting out its
    #: grace period (retiring) does not: an emergency must be possible during those days.
    BLOCKING_STATES = ACTIVE_STATES[:-1]

    kek = models.ForeignKey(
        KeyEncryptionKey, on_delete=models.PROTECT, related_name="rotation_runs", verbose_name="key-encryption key",
        null=True, blank=True,
    )
    secret = models.ForeignKey(
        ManagedSecret, on_delete=models.PROTECT, related_name="rotation_runs", verbose_name="managed secret",
        null=True, blank=True, help_text="The managed secret this run rotates (instead of a KEK).",
    )
    executor_state = models.JSONField(
        "executor state", default=dict, blank=True,
        help_text="Non-secret progress of a secret rotation (versions, active user, certificate fingerprints); "
        "never a secret value.",
    )
    destination_kek = models.ForeignKey(
        KeyEncryptionKey, on_delete=models.PROTECT, related_name="migration_runs", null=True, blank=True,
        verbose_name="destination KEK", help_text="For migrations: the KEK (on another provider) data keys move to.",
    )
    policy = models.ForeignKey(RotationPolicy, on_delete=models.SET_NULL, null=True, blank=True, related_name="runs")
    kind = models.CharField("kind", max_length=16, choices=Kind.choices, default=Kind.ON_DEMAND)
    state = models.CharField("state", max_length=20, choices=State.choices, default=State.QUEUED, db_index=True)
    initiated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+",
        verbose_name="initiated by (user)",
    )
    initiator = models.CharField("initiator", max_length=150, help_text="Actor that started the run (user:… or system:…).")
    reason = models.TextField("reason", blank=True)
    incident_ref = models.CharField(
        "incident / ticket", max_length=100, blank=True, help_text="Required for emergency rotations."
    )
    previous_version = models.PositiveIntegerField("previous primary", null=True, blank=True)
    target_version = models.PositiveIntegerField("new primary", null=True, blank=True)
    total_deks = models.PositiveBigIntegerField("data keys to rewrap", default=0)
    rewrapped = models.PositiveBigIntegerField("rewrapped", default=0)
    failed_deks = models.PositiveBigIntegerField("failed", default=0)
    retire_after = models.DateTimeField("retire after", null=True, blank=True)
    created_at = models.DateTimeField("created", auto_now_add=True)
    started_at = models.DateTimeField("started", null=True, blank=True)
    rewrap_started_at = models.DateTimeField("rewrap started", null=True, blank=True)
    finished_at = models.DateTimeField("finished", null=True, blank=True)
    heartbeat_at = models.DateTimeField("last progress", null=True, blank=True)
    next_attempt_at = models.DateTimeField(
        "next attempt", null=True, blank=True,
        help_text="While paused: when the retrying task tries again (the sweep leaves the run alone until then).",
    )
    paused_reason = models.CharField("paused because", max_length=255, blank=True)
    last_error = models.TextField("last error", blank=True)
    celery_task_id = models.CharField("task id", max_length=64, blank=True)

    class Meta:
        """At most one active run per target, enforced by the database."""

        verbose_name = "rotation run"
        verbose_name_plural = "rotation runs"
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["kek"],
                condition=Q(state__in=["pending_approval", "queued", "rotating", "rewrapping", "verifying"]),
                name="rotationrun_one_active_per_kek",
            ),
            models.UniqueConstraint(
                fields=["secret"],
                condition=Q(state__in=["pending_approval", "queued", "rotating", "rewrapping", "verifying"]),
                name="rotationrun_one_active_per_secret",
            ),
            models.CheckConstraint(
                condition=Q(kek__isnull=False, secret__isnull=True) | Q(kek__isnull=True, secret__isnull=False),
                name="rotationrun_has_one_target",
            ),
        ]
        permissions = [
            ("approve_rotationrun", "Can approve rotation runs"),
            ("cancel_rotationrun", "Can cancel and roll back rotation runs"),
            ("emergency_rotationrun", "Can start emergency rotations"),
            ("tick_runstep", "Can tick manual runbook steps"),
        ]

    def __str__(self) -> str:
        return f"run #{self.pk} ({self.get_kind_display().lower()}) of {self.target_label}"

    @property
    def target_label(self) -> str:
        if self.kek_id:
            return f"KEK {self.kek.name}"
        return f"secret {self.secret.name}" if self.secret_id else "?"

    @property
    def target(self):
        """The KEK or managed secret this policy (or run) is about."""
        return self.kek if self.kek_id else self.secret

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES

    @property
    def remaining(self) -> int:
        return max(0, self.total_deks - self.rewrapped)

    @property
    def percent(self) -> float:
        if self.state == self.State.COMPLETED or (self.total_deks == 0 and self.state not in self.ACTIVE_STATES[:3]):
            return 100.0
        return round(100.0 * self.rewrapped / self.total_deks, 1) if self.total_deks else 0.0


class RunStep(models.Model):
    """One runbook step of a run, ticked by the engine or by a person."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DONE = "done", "Done"
        SKIPPED = "skipped", "Skipped"
        FAILED = "failed", "Failed"

    run = models.ForeignKey(RotationRun, on_delete=models.CASCADE, related_name="steps")
    section = models.CharField("section", max_length=20, help_text="pre_checks, steps, verification or rollback.")
    key = models.CharField("key", max_length=64, help_text="Stable id of the step within its runbook.")
    title = models.TextField("step")
    automatic = models.BooleanField("automatic", default=False, help_text="Ticked by the engine, not by a person.")
    order = models.PositiveSmallIntegerField("order")
    status = models.CharField("status", max_length=10, choices=Status.choices, default=Status.PENDING)
    done_by = models.CharField("done by", max_length=150, blank=True)
    done_at = models.DateTimeField("done at", null=True, blank=True)
    evidence = models.TextField("evidence", blank=True, help_text="Output or notes proving the step was done.")

    class Meta:
        """Steps in runbook order."""

        verbose_name = "runbook step"
        verbose_name_plural = "runbook steps"
        ordering = ["run_id", "order"]
        constraints = [models.UniqueConstraint(fields=["run", "key"], name="runstep_unique_key")]
        default_permissions = ("view",)

    def __str__(self) -> str:
        return self.title


class Approval(models.Model):
    """A decision on a run by someone other than its initiator."""

    class Decision(models.TextChoices):
        APPROVE = "approve", "Approve"
        REJECT = "reject", "Reject"

    run = models.ForeignKey(RotationRun, on_delete=models.CASCADE, related_name="approvals")
    approver = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    decision = models.CharField("decision", max_length=10, choices=Decision.choices)
    comment = models.TextField("comment")
    break_glass = models.BooleanField("break-glass", default=False, help_text="Bypassed the approval rule, with a reason.")
    created_at = models.DateTimeField("decided at", auto_now_add=True)

    class Meta:
        """One decision per person per run."""

        verbose_name = "approval"
        verbose_name_plural = "approvals"
        ordering = ["created_at"]
        constraints = [models.UniqueConstraint(fields=["run", "approver"], name="approval_one_per_person")]
        default_permissions = ("view",)

    def __str__(self) -> str:
        return f"{self.get_decision_display()} by {self.approver} on run #{self.run_id}"


class RewrapPartition(models.Model):
    """One id range of a run's rewrap, leased by the worker doing it.

    A worker takes the lease before its first batch and renews it before each one; a
    lease that runs out (its worker died) is taken over by any worker or re-dispatched
    by the sweep. The rows are bookkeeping only: what is left to rewrap is always the
    driver's query, so a range done twice changes nothing the second time.
    """

    run = models.ForeignKey(RotationRun, on_delete=models.CASCADE, related_name="partitions")
    lo = models.BigIntegerField("first id")
    hi = models.BigIntegerField("end id", help_text="Exclusive.")
    cursor = models.BigIntegerField("done up to", help_text="Ids up to here were handled when the lease was last renewed.")
    owner = models.CharField("leased by", max_length=200, blank=True, help_text="Empty: sent to workers, not yet taken.")
    lease_expires_at = models.DateTimeField("lease expires", null=True, blank=True)
    takeovers = models.PositiveIntegerField("taken over", default=0, help_text="Times an expired lease was taken over.")
    created_at = models.DateTimeField("created", auto_now_add=True)
    done_at = models.DateTimeField("done", null=True, blank=True)

    class Meta:
        """The sweep looks for open partitions whose lease ran out."""

        verbose_name = "rewrap partition"
        verbose_name_plural = "rewrap partitions"
        ordering = ["run_id", "lo"]
        indexes = [models.Index(fields=["done_at", "lease_expires_at"], name="rewrappartition_open")]
        default_permissions = ("view",)

    def __str__(self) -> str:
        return f"ids [{self.lo}, {self.hi}) of run #{self.run_id}"


class OutboxMessage(models.Model):
    """A task the engine decided to send, written in the transaction that decided it.

    It is sent after commit and deleted once the broker took it; if the broker was down
    (or the process died in between), the sweep sends it again. Tasks are idempotent, so
    a message sent twice costs nothing, and one never sent cannot strand a run.
    """

    task = models.CharField("task", max_length=100)
    args = models.JSONField("arguments", default=list)
    options = models.JSONField("options", default=dict)
    created_at = models.DateTimeField("created", auto_now_add=True)
    next_attempt_at = models.DateTimeField("next attempt", db_index=True)
    attempts = models.PositiveIntegerField("failed attempts", default=0)
    last_error = models.CharField("last error", max_length=255, blank=True)

    class Meta:
        """Oldest first."""

        verbose_name = "outbox message"
        verbose_name_plural = "outbox messages"
        ordering = ["id"]
        default_permissions = ("view",)

    def __str__(self) -> str:
        return f"{self.task}{tuple(self.args)}"


class ProviderRateLimit(models.Model):
    """The rotation engine's shared budget of calls per second at one KMS provider, and its live state.

    Every worker reserves from this row before a batch (``rotation.engine.ratelimit``), so
    the cap holds across all of them. People change only ``cap`` (through
    ``ratelimit.set_cap``, audited); the rest is the engine's bookkeeping.
    """

    provider = models.CharField(
        "provider", max_length=64, unique=True, help_text="Provider name, as in HMD_KMS_PROVIDER (aws, gcp, vault …).",
    )
    cap = models.PositiveIntegerField(
        "cap (calls/s)", null=True, blank=True,
        help_text="Provider calls per second rotations may make, all workers together. Empty: the "
        "HMD_ROTATION_RATE_LIMITS default; 0: no cap.",
    )
    factor = models.FloatField(
        "share of the cap allowed", default=1.0,
        help_text="Below 1 after the provider throttled rotation traffic; it grows back gradually.",
    )
    factor_since = models.FloatField("factor set at (epoch s)", default=0.0)
    base_rate = models.FloatField(
        "base rate", null=True, blank=True,
        help_text="For a provider without a cap: the rate measured when it first throttled (what the factor scales).",
    )
    next_free_at = models.FloatField("next free slot (epoch s)", default=0.0)
    blocked_until = models.FloatField("paused until (epoch s)", default=0.0)
    throttles = models.PositiveIntegerField("throttling errors", default=0)
    last_throttled_at = models.FloatField("last throttled (epoch s)", default=0.0)
    window_started = models.FloatField("window started (epoch s)", default=0.0)
    window_calls = models.FloatField("calls in the window", default=0.0)
    measured_rate = models.FloatField("measured calls/s", null=True, blank=True)
    updated_at = models.DateTimeField("updated", auto_now=True)

    class Meta:
        """One row per provider, made on first use or when a person sets a cap."""

        verbose_name = "provider rate limit"
        verbose_name_plural = "provider rate limits"
        ordering = ["provider"]
        default_permissions = ("add", "view", "change")

    def __str__(self) -> str:
        return f"rate limit of {self.provider}"
